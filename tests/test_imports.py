"""The package's shape: layers that import only downwards, no import cycle anywhere in
``src/cifar100``, and a loop that knows no model.

Imports are read with ``ast``, never executed. Imports inside functions count like
module-level ones: moving an import into a function is how a cycle gets hidden (the run
works until the day someone moves it back), so it is still a cycle here. An import names
the module it reads from (``from cifar100.models import build_model``: ``cifar100.models``;
``from cifar100.models import cnn``: ``cifar100.models.cnn``); the parent package Python
initialises first is not an edge, so a package's ``__init__`` may import its own
submodules (the model registry does). ``importlib.import_module`` with a computed name
(the CLI loading ``cifar100.commands.*``) is not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cifar100"


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The ``known`` modules that the module ``name`` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def import_graph(root: Path = SRC / PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, for every module under ``root``."""
    names = {path: module_name(path, root.parent) for path in sorted(root.rglob("*.py"))}
    known = set(names.values())
    return {
        name: imported_modules(
            ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known
        )
        for path, name in names.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts (``[a, b, a]``), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def imported_by(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


# Bottom to top; a module may import from its own layer and the ones before it. The root
# package (``cifar100/__init__``) holds the version and loads the API lazily, so it sits at
# the bottom with the errors; the API, the entry points and the commands sit on top.
LAYERS = (
    ("cifar100", "cifar100.errors"),
    ("cifar100.config",),
    ("cifar100.runtime",),
    ("cifar100.data",),
    ("cifar100.models",),
    ("cifar100.runs",),
    ("cifar100.evaluation",),
    ("cifar100.training",),
    ("cifar100.records",),
    ("cifar100.recipes",),
    ("cifar100.tuning",),
    ("cifar100.deploy",),
    ("cifar100.api", "cifar100.cli", "cifar100.commands", "cifar100.__main__"),
)


def layer_of(module: str, layers=LAYERS) -> int:
    """Index of the layer ``module`` belongs to: the longest prefix that names it (the root
    package, first of all, names only itself)."""
    root, best, index = layers[0][0], "", None
    for i, prefixes in enumerate(layers):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != root
            if (module == prefix or inside) and len(prefix) > len(best):
                best, index = prefix, i
    if index is None:
        raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS")
    return index


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """``a -> b`` for every import from a higher layer than the importer's."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target, layers) > layer_of(module, layers)
    )


def test_every_import_points_down_a_layer():
    graph = import_graph()
    assert "cifar100.deploy.serving" in graph  # the walk reached the subpackages
    assert upward_imports(graph) == []


def test_the_top_of_the_package_holds_only_the_api_entry_points_and_errors():
    top = {path.name for path in (SRC / PACKAGE).glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "api.py", "cli.py", "errors.py"}
    for folder in (SRC / PACKAGE).rglob("*/"):
        if folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert len(list(folder.glob("*.py"))) <= 13, f"{folder}: split it"


def test_an_upward_import_is_found(tmp_path):
    """The layer check can fail: a low layer reaching into a higher one, even inside a
    function, and a module in no layer."""
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "high").mkdir()
    for init in (package, package / "low", package / "high"):
        (init / "__init__.py").write_text("")
    (package / "high" / "top.py").write_text("from pkg.low.base import thing\n")
    (package / "low" / "base.py").write_text(
        "thing = 1\n\ndef later():\n    from pkg.high import top\n    return top\n"
    )
    layers = (("pkg", "pkg.low"), ("pkg.high",))
    graph = import_graph(package)
    assert upward_imports(graph, layers) == ["pkg.low.base -> pkg.high.top"]
    with pytest.raises(AssertionError, match="pkg.other belongs to no layer"):
        layer_of("pkg.other", layers)


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert (
        "cifar100.training.loop" in graph and "cifar100.models.cnn" in graph
    )  # the walk found them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_loop_knows_no_model():
    """The loop trains what it is handed: neither it nor anything it imports reaches the
    models, their stage plans, or the training entry point."""
    graph = import_graph()
    reached = imported_by(graph, "cifar100.training.loop")
    banned = {
        m
        for m in reached
        if m == "cifar100.models"
        or m.startswith("cifar100.models.")
        or m in ("cifar100.training.transfer", "cifar100.training.plans", "cifar100.training.train")
    }
    assert not banned, f"cifar100.training.loop reaches {sorted(banned)}"
    assert "cifar100.training.engine" in reached  # the walk does follow its imports


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """The check can fail: the training <-> transfer cycle it replaced, written the old way
    (one side imports inside a function), and a relative import."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "training.py").write_text(
        "def train_stages(run):\n    from pkg.transfer import run_transfer\n"
        "    return run_transfer(run)\n"
    )
    (package / "transfer.py").write_text("from .training import train_stages\n")
    (package / "plain.py").write_text("import pkg.transfer\n")
    graph = import_graph(package)
    assert graph["pkg.plain"] == {"pkg.transfer"}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["pkg.training", "pkg.transfer"]


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle
