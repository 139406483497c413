"""The model registry as a table: input size, normalisation, parameters and FLOPs per image."""

from __future__ import annotations

from cifar100.config.schema import ModelConfig
from cifar100.models import REGISTRY, build_model, count_flops, count_parameters


def describe() -> list[dict]:
    """One row per registered model, by name: what ``cifar100 models`` lists."""
    rows = []
    for name, spec in sorted(REGISTRY.items()):
        model = build_model(ModelConfig(name=name))
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
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """``describe()``'s rows as an aligned text table."""
    width = max(len("model"), *(len(row["name"]) for row in rows))
    lines = [f"{'model':<{width}} {'input':>5} {'params':>11} {'MFLOPs/img':>10}  description"]
    lines += [
        f"{row['name']:<{width}} {row['input_size']:>5} {row['parameters']:>11,} "
        f"{row['mflops_per_image']:>10}  {row['description']}"
        for row in rows
    ]
    return "\n".join(lines)
