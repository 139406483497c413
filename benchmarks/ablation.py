"""Which recipe choices pay? Validation top-1 of short runs of a preset, one change each.

Every variant is the preset (default ``cnn-fast``) shortened to ``--epochs`` (its warm-up
scaled alike) with one setting changed: a choice the recipe makes is taken out, or one it
leaves out is put in. Each is an ordinary ``train()`` run with ``test_set=False``: the
figure is the run's validation top-1 (its best epoch; under one-cycle the last), so the
recipe is chosen without ever reading the test set.

    python benchmarks/ablation.py [--preset cnn-fast] [--epochs 6] [--precision bf16]
        [--data-dir DIR] [--runs-dir runs/ablation] [--variants NAME ...] [--set K=V ...]
        [--teacher RUN ...]
        [--out results/benchmarks/ablation-cnn-fast.json] [--doc docs/recipe.md]

A finished variant (``results.json`` in its folder) is reused, an interrupted one resumed,
so a killed ablation continues where it stopped; a folder whose recorded config differs
is refused, never replaced. ``--doc FILE`` writes the table between the
``<!-- ablation:start -->`` and ``<!-- ablation:end -->`` lines of FILE (``--marker``
names another pair) from ``--out``'s
figures, so the doc's numbers are never typed. One seed per variant: differences under
about half a point are within seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

from cifar100.config.schema import Config
from cifar100.recipes.flags import from_flags
from cifar100.records.table import write_between
from cifar100.runs.folders import load_run_config, read_json
from cifar100.training.train import train

COURSEWORK_OPTIM = ["optim.optimizer=adam", "optim.lr=0.001", "optim.weight_decay=0"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the preset as it is", []),
    "no-label-smoothing": ("label smoothing 0.2 -> 0", ["optim.label_smoothing=0"]),
    "no-translate": ("no random 4 px crop (flip only)", ["augment.translate=0"]),
    "ema": ("+ weight EMA 0.999, fixed decay", ["train.ema_decay=0.999"]),
    "ema-warmup": (
        "+ weight EMA 0.999, timm warm-up of the decay",
        ["train.ema_decay=0.999", "train.ema_warmup=timm"],
    ),
    "ema-span": (
        "+ weight EMA sized to the run: the last 5% of its steps",
        ["train.ema_span=0.05"],
    ),
    "muon": (
        "Muon (lr 0.24, momentum 0.6) for the conv filters, SGD for the rest",
        ["optim.optimizer=muon"],
    ),
    "muon-lr-0.08": (
        "Muon as above at a third of the lr (0.08): a longer run takes more steps",
        ["optim.optimizer=muon", "optim.muon_lr=0.08"],
    ),
    "muon-lr-0.5": (
        "Muon as above at twice the lr (0.5)",
        ["optim.optimizer=muon", "optim.muon_lr=0.5"],
    ),
    "muon-ema-span": (
        "Muon, + weight EMA over the last 5% of the steps",
        ["optim.optimizer=muon", "train.ema_span=0.05"],
    ),
    "mixup": ("+ MixUp, alpha 0.2", ["augment.mixup_alpha=0.2"]),
    "cutmix": ("+ CutMix, alpha 1.0", ["augment.cutmix_alpha=1.0"]),
    "cutmix-off-last": (
        "+ CutMix, alpha 1.0, off in the last epoch",
        ["augment.cutmix_alpha=1.0", "augment.mix_off_epochs=1"],
    ),
    # "{half}": half the run's epochs, so the variant means the same at --epochs 6 and 15.
    "progressive-resize": (
        "progressive resizing, 24 -> 32 px over the first half",
        ["train.resize_start=24", "train.resize_epochs={half}"],
    ),
    "adam-plateau": (
        "the coursework's optimiser: Adam 1e-3, ReduceLROnPlateau",
        [*COURSEWORK_OPTIM, "optim.schedule=plateau"],
    ),
    # "{teachers}": the --teacher runs; these variants run only when teachers are given.
    "distill-cached": (
        "+ distillation from the teachers, their logits cached for 4 views per image",
        ["distill.teachers={teachers}", "distill.mode=cached", "distill.views=4"],
    ),
    "distill-online": (
        "+ distillation from the teachers, run on every batch",
        ["distill.teachers={teachers}", "distill.mode=online"],
    ),
}
NEEDS_TEACHERS = ("distill-cached", "distill-online")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.variants or [n for n in VARIANTS if args.teachers or n not in NEEDS_TEACHERS]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if not args.teachers and (taught := [n for n in names if n in NEEDS_TEACHERS]):
        raise SystemExit(f"variant {taught[0]!r} needs --teacher RUN [RUN ...]")
    runs_dir = args.runs_dir / f"{args.preset}-{args.epochs}ep"
    rows = []
    for name in names:
        change, sets = VARIANTS[name]
        config = variant_config(args, sets)
        results = run_variant(config, runs_dir / name)
        rows.append(row_of(name, change, sets, results, runs_dir / name))
        print(f"{name:>20}  val top-1 {results['val_top1']:.2%}  ({results['train_minutes']} min)")
    record = {
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "preset": args.preset,
        "epochs": args.epochs,
        "precision": args.precision,
        "common_sets": args.sets,
        "teachers": args.teachers,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    if args.doc:
        write_doc_table(args.doc, record, args.marker)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cnn-fast")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--data-dir", help="folder holding cifar-100-python/")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--variants", nargs="+", help=f"default: all of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="K=V",
        help="a setting for every variant (e.g. data.train_subset=5000)",
    )
    parser.add_argument(
        "--teacher",
        dest="teachers",
        nargs="+",
        default=[],
        metavar="RUN",
        help="trained runs that teach the distill-* variants (several: an ensemble)",
    )
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    parser.add_argument("--doc", type=Path, help="Markdown file with MARKER:start/end lines")
    parser.add_argument("--marker", default="ablation", help="the doc's table marker")
    return parser.parse_args(argv)


def variant_config(args: argparse.Namespace, sets: list[str]) -> Config:
    """The preset at ``args.epochs`` with its warm-up scaled alike, then the variant's sets."""
    teachers = "[" + ", ".join(args.teachers) + "]"
    sets = [s.format(half=args.epochs // 2, teachers=teachers) for s in sets]
    preset = from_flags(args.preset)
    flags = {"epochs": args.epochs, "data_dir": args.data_dir, "precision": args.precision}
    config = from_flags(args.preset, sets=[*args.sets, *sets], **flags)
    if config.optim.schedule == "plateau":  # no warm-up to scale (and setting one is refused)
        return config
    scale = args.epochs / preset.train.epochs
    warmup = f"optim.warmup_epochs={round(preset.optim.warmup_epochs * scale, 2)}"
    return from_flags(args.preset, sets=[warmup, *args.sets, *sets], **flags)


def run_variant(config: Config, run_dir: Path) -> dict:
    """Train the variant, or reuse/resume what an earlier call left in ``run_dir``."""
    if not (run_dir / "run.json").exists():
        return train(config, run_dir, test_set=False)
    if load_run_config(run_dir) != config:
        raise SystemExit(
            f"{run_dir}: holds a run of another config; choose another --runs-dir or remove it"
        )
    if (run_dir / "results.json").exists():
        return read_json(run_dir / "results.json")
    return train(config, run_dir, resume=True, test_set=False)


def row_of(name: str, change: str, sets: list[str], results: dict, run_dir: Path) -> dict:
    info = read_json(run_dir / "run.json")
    return {
        "variant": name,
        "change": change,
        "sets": sets,
        "val_top1": results["val_top1"],
        "val_top5": results["val_top5"],
        "best_epoch": results["best_epoch"],
        "train_minutes": results["train_minutes"],
        "commit": info.get("commit"),
        "cpu": info.get("hardware", {}).get("cpu"),
        "precision": info.get("hardware", {}).get("precision"),
        "run_dir": str(run_dir),
    }


def write_doc_table(path: Path, record: dict, marker: str = "ablation") -> None:
    rows = record["rows"]
    base = next((r["val_top1"] for r in rows if r["variant"] == "baseline"), None)
    commits = sorted({str(r["commit"]) for r in rows})
    cpus = sorted({str(r["cpu"]) for r in rows})
    lines = [
        f"`{record['command']}` ({record['date']}; {', '.join(cpus)}; "
        f"{'/'.join(sorted({str(r['precision']) for r in rows}))}; commit {', '.join(commits)})",
        "",
        "| variant | change | val top-1 | vs baseline | val top-5 | best epoch | train min |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        delta = (
            ""
            if base is None or r["variant"] == "baseline"
            else (f"{(r['val_top1'] - base) * 100:+.2f}")
        )
        lines.append(
            f"| {r['variant']} | {r['change']} | {r['val_top1']:.2%} | {delta} | "
            f"{r['val_top5']:.2%} | {r['best_epoch']} | {r['train_minutes']:.1f} |"
        )
    write_between(path, marker, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
