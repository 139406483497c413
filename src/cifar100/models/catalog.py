"""The model registry as a table: input size, normalisation, parameters and FLOPs per image
(a pretrained backbone's at other input sizes too), and what each has reached where
records say so."""

from __future__ import annotations

from collections.abc import Sequence

from cifar100.config.schema import ModelConfig
from cifar100.models import REGISTRY, build_model, count_flops, count_parameters


def describe(sizes: Sequence[int] = ()) -> list[dict]:
    """One row per registered model, by name: what ``cifar100 models`` lists. ``sizes``:
    also each pretrained backbone's MFLOPs per image at these input sizes (what a transfer
    run costs at ``model.image_size``; the from-scratch networks run at their own size)."""
    rows = []
    for name, spec in sorted(REGISTRY.items()):
        model = build_model(ModelConfig(name=name))
        at_sizes = {
            str(size): round(count_flops(model, size) / 1e6, 1)
            for size in (sizes if spec.pretrained else ())
        }
        rows.append(
            {
                "name": name,
                "input_size": spec.input_size,
                "parameters": count_parameters(model),
                "mflops_per_image": round(count_flops(model, spec.input_size) / 1e6, 1),
                "mean": spec.mean,
                "std": spec.std,
                "pretrained": spec.pretrained,
                "description": spec.description,
                **({"mflops_at_size": at_sizes} if at_sizes else {}),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """``describe()``'s rows as an aligned text table; a row's FLOPs at other sizes and its
    ``reached`` records (best test top-1 per kind of hardware) on indented lines below it."""
    width = max(len("model"), *(len(row["name"]) for row in rows))
    lines = [f"{'model':<{width}} {'input':>5} {'params':>11} {'MFLOPs/img':>10}  description"]
    for row in rows:
        lines.append(
            f"{row['name']:<{width}} {row['input_size']:>5} {row['parameters']:>11,} "
            f"{row['mflops_per_image']:>10}  {row['description']}"
        )
        if row.get("mflops_at_size"):
            sizes, flops = zip(*row["mflops_at_size"].items(), strict=True)
            costs = " / ".join(f"{f:,.0f}" for f in flops)
            lines.append(f"    MFLOPs/img at {' / '.join(sizes)} px: {costs}")
        lines += [
            f"    reached {entry['test_top1']:.2%} test top-1 on a {entry['hardware']} "
            f"({entry['record']})"
            for entry in row.get("reached", ())
        ]
    return "\n".join(lines)
