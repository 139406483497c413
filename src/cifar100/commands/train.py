"""``cifar100 train``: train a model, evaluate the best checkpoint on the test set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar100.config import PRESETS_DIR, load_config, parse_overrides, preset_names
from cifar100.models import model_spec
from cifar100.runs import load_run_config, new_run_dir
from cifar100.training import train


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model and report its test accuracy",
                              description=__doc__)
    p.add_argument("--model", help="cnn-seed, cnn-fast, mobilenetv2 or efficientnet-lite0 "
                   "(default: the preset's; see `cifar100 models`)")
    p.add_argument("--preset", help=f"named recipe: {', '.join(preset_names())} "
                   "(default: the recipe named like --model, else 'quick')")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML file(s) applied on top of the preset, in order")
    p.add_argument("--epochs", type=int,
                   help="number of epochs (per stage for the pretrained models)")
    p.add_argument("--seed", type=int, help="fixes split, initialisation and augmentation")
    p.add_argument("--train-subset", type=int, metavar="N",
                   help="train on a class-balanced subset of N images (smoke runs)")
    p.add_argument("--data-dir", help="folder holding cifar-100-python/ (or $CIFAR100_DATA)")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/MODEL-TIMESTAMP)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run exactly where it stopped")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set optim.lr=0.01")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    preset = args.preset or (args.model if args.model and (
        PRESETS_DIR / f"{args.model}.yaml").exists() else None) or (
        None if args.model else "quick")
    overrides = parse_overrides(args.set)
    flags = {("model", "name"): args.model, ("train", "epochs"): args.epochs,
             ("train", "seed"): args.seed, ("data", "train_subset"): args.train_subset,
             ("data", "data_dir"): args.data_dir, ("train", "device"): args.device}
    for (section, key), value in flags.items():
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    config = load_config(preset, args.config, overrides)
    if args.epochs is not None and config.transfer and model_spec(config.model.name).pretrained:
        # --epochs sets each stage's length; a stage the recipe leaves off stays off.
        stages = {"stage1_epochs": args.epochs}
        if config.transfer.stage2_epochs > 0:
            stages["stage2_epochs"] = args.epochs
        config = load_config(preset, args.config, {**overrides, "transfer": {
            **overrides.get("transfer", {}), **stages}})
    return config


def run(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = args.resume
        config = load_run_config(run_dir)
        if args.data_dir:  # the data may live elsewhere on the resuming machine
            from dataclasses import replace
            config = replace(config, data=replace(config.data, data_dir=args.data_dir))
    else:
        config = resolve_config(args)
        run_dir = args.run_dir or new_run_dir("runs", config.model.name)
    results = train(config, run_dir, resume=bool(args.resume), command=args.argv)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"\n{results['model']}: test top-1 {results['test_top1']:.2%}, top-5 "
              f"{results['test_top5']:.2%} (best epoch {results['best_epoch']}, "
              f"{results['train_minutes']:.1f} min) -> {run_dir}")
    return 0
