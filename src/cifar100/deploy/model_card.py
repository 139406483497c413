"""The model card (README.md) of a hub folder, written from its config.json.

Hubs read the YAML front matter (task, data set, metrics) and show the Markdown below it.
Every number comes from the config: metrics measured on the test set by
``cifar100.deploy.hub.test_metrics``, and the run record (recipe, hardware, training time).
"""

from __future__ import annotations

from typing import Any

import yaml

from cifar100.evaluation.metrics import tta_note

# Settings that say how a run was executed, not what it learned: left out of the recipe.
EXECUTION_KEYS = {
    "data_dir",
    "device",
    "threads",
    "eval_batch_size",
    "checkpoint_minutes",
    "sync_every",
    "sync_bn",
    "compile",
    "compile_mode",
    "cache_features",
    "weights",
}
RECIPE_SECTIONS = ("model", "data", "augment", "optim", "train", "transfer")
HUB_DATASET = "uoft-cs/cifar100"  # the data set's name on the Hugging Face hub


def render_card(config: dict[str, Any]) -> str:
    """README.md for a folder whose config.json is ``config``."""
    parts = [
        _front_matter(config),
        _intro(config),
        _usage(),
        _metrics(config),
        _data(config),
        _recipe(config),
        _hardware(config),
        _limitations(config),
    ]
    return "\n".join(parts)


def _name(config: dict[str, Any]) -> str:
    return str(config["training"].get("name") or config["architecture"] or "cifar100-model")


def _front_matter(config: dict[str, Any]) -> str:
    m = config["metrics"]
    metrics = [
        {"type": "accuracy", "value": round(m["top1"], 4), "name": "Top-1 accuracy"},
        {"type": "accuracy", "value": round(m["top5"], 4), "name": "Top-5 accuracy"},
    ]
    front = {
        "library_name": "cifar100",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "cifar100", "pytorch", "safetensors"],
        "datasets": [HUB_DATASET],
        "metrics": ["accuracy"],
        "model-index": [
            {
                "name": _name(config),
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": "CIFAR-100", "type": HUB_DATASET, "split": "test"},
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"


def _intro(config: dict[str, Any]) -> str:
    params = config["training"].get("parameters")
    size = f", {params / 1e6:.2f} M parameters" if params else ""
    return (
        f"# {_name(config)}\n\n"
        f"A CIFAR-100 image classifier ({config['architecture']}{size}) trained with the "
        "`cifar100` project: it names one of 100 classes (in 20 superclasses) for a "
        "small photo of an object or animal.\n"
    )


def _usage() -> str:
    return (
        "## Use\n\n"
        "With the `cifar100` project installed (`pip install -e .`, and `.[demo]` for the "
        "page), this folder is a model:\n\n"
        "```bash\n"
        "cifar100 predict photo.jpg --model THIS_FOLDER   # top-5 classes\n"
        "cifar100 serve --model THIS_FOLDER               # the page at http://127.0.0.1:7860\n"
        "```\n\n"
        "```python\n"
        "import cifar100\n\n"
        'model = cifar100.load_model("THIS_FOLDER")\n'
        'model.predict(["photo.jpg"])[0].top   # [(class name, probability), ...]\n'
        "```\n\n"
        "Without it: `model.safetensors` holds the network's weights (its metadata repeats "
        "this folder's `config.json`); `config.json` names the classes (`id2label`), the "
        "preprocessing and the architecture's settings (`config.model`).\n"
    )


def _metrics(config: dict[str, Any]) -> str:
    m, t = config["metrics"], config["training"]
    rows = [
        ("Top-1 accuracy", f"{m['top1']:.2%}"),
        ("Top-5 accuracy", f"{m['top5']:.2%}"),
        (
            "Superclass accuracy (top-1 lands in the true superclass)",
            f"{m['superclass_accuracy']:.2%}",
        ),
        ("Expected calibration error (15 bins)", f"{m['ece']:.4f}"),
        ("Negative log-likelihood", f"{m['nll']:.4f}"),
    ]
    text = (
        f"## Metrics\n\nMeasured on the {m['images']:,} CIFAR-100 test images with the "
        "weights in this folder, one view per image (no test-time augmentation), as "
        "`predict` and `serve` use them"
        + (
            f"; logits divided by the fitted temperature {m['temperature']:.4f}"
            if m["temperature"] != 1.0
            else ""
        )
        + ".\n\n| Metric | Value |\n|---|--:|\n"
        + "".join(f"| {name} | {value} |\n" for name, value in rows)
    )
    if "test_top1" in t:
        tta = f" with {tta_note(t)}" if tta_note(t) else ""
        text += (
            f"\nThe training run's own test numbers{tta}: top-1 {t['test_top1']:.2%}, "
            f"top-5 {t['test_top5']:.2%}.\n"
        )
    return text


def _data(config: dict[str, Any]) -> str:
    data = config["config"].get("data", {})
    t = config["training"]
    used = f"{t['train_images']:,}" if t.get("train_images") else "most"
    return (
        "## Data\n\n"
        "CIFAR-100 (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html): 60,000 "
        "colour images of 32x32 pixels in 100 classes, 600 per class. Of its 50,000 training "
        f"images, {used} trained the model and a stratified "
        f"{data.get('val_fraction', 0.2):.0%} (split seed {data.get('split_seed', 0)}) was "
        "held out for validation (choosing the best epoch); the 10,000 test images were "
        "used only for the numbers above.\n"
    )


def _recipe(config: dict[str, Any]) -> str:
    saved, t = config["config"], config["training"]
    lines = ["## Training recipe\n"]
    for section in RECIPE_SECTIONS:
        if section == "transfer" and config.get("plan") != "transfer":
            continue  # a model trained from scratch ignores these settings
        values = saved.get(section) or {}
        shown = [f"{k} {v}" for k, v in values.items() if k not in EXECUTION_KEYS and v is not None]
        if shown:
            lines.append(f"- **{section}**: {', '.join(shown)}")
    if t.get("best_stage") is not None:
        lines.append(f"- **best checkpoint**: stage {t['best_stage']}, epoch {t['best_epoch']}")
    if t.get("command"):
        lines.append(f"\nMade with `{t['command']}` at commit `{t.get('commit') or 'unknown'}`.")
    return "\n".join(lines) + "\n"


def _hardware(config: dict[str, Any]) -> str:
    t = config["training"]
    hw = t.get("hardware") or {}
    if not hw and "train_minutes" not in t:
        return (
            "## Hardware and training time\n\nNot recorded (exported from a checkpoint "
            "without its run folder).\n"
        )
    device = hw.get("gpu") or f"{hw.get('cpu', 'CPU')}, {hw.get('threads', '?')} threads"
    if hw.get("precision") == "bf16":
        device += ", bf16 autocast"
    minutes = t.get("train_minutes")
    took = f"{minutes:.1f} minutes" if minutes is not None else "an unrecorded time"
    load, threads = hw.get("load_average"), hw.get("threads")
    shared = (
        f" The machine was shared with other work (load average {load} on {threads} threads "
        "at the start), so the recipe alone needs less time."
        if load is not None and threads and load > threads
        else ""
    )
    return (
        "## Hardware and training time\n\n"
        f"Trained in {took} on {device} ({hw.get('device', 'cpu')}; PyTorch "
        f"{hw.get('torch', '?')}, Python {hw.get('python', '?')}), started "
        f"{t.get('started', 'at an unrecorded time')}.{shared}\n"
    )


def _limitations(config: dict[str, Any]) -> str:
    size = config["preprocessing"]["resize"]["size"]
    model_size = config["preprocessing"]["model_input_size"]
    inside = (
        f" (then enlarged to {model_size} px inside the model, which adds no detail back)"
        if model_size != size
        else ""
    )
    return (
        "## Limitations\n\n"
        f"- **{size}x{size} inputs.** Every photo is cut to its largest centred square and "
        f"shrunk to {size}x{size} pixels before the model sees it{inside}: small objects, "
        "off-centre subjects and fine detail are lost.\n"
        "- **CIFAR-100 classes only.** The model always answers with one of its 100 classes; "
        "it has no 'none of these'. A photo of anything else (a cat: CIFAR-100 has none) "
        "still gets one of those names.\n"
        "- **The data's world.** CIFAR-100 images are small web photos collected around "
        "2008; accuracy on other kinds of images (drawings, phone photos, other regions) is "
        "not measured here; nor is bias in the classes that show people (baby, boy, girl, "
        "man, woman).\n"
        "- **Licence.** The code that made it is MIT-licensed; a model fine-tuned from "
        "ImageNet weights also inherits their terms. Set the hub's licence field to match.\n"
    )
