"""``train --resume``: the config an interrupted or finished run continues with.

A run continues with its own recorded settings; only what cannot change its meaning may
differ (``RESUME_FLAGS``): more epochs, another device of the same type, where the data
now is. Anything else is refused with the reason rather than silently dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from cifar100.config.schema import Config, ConfigError, from_dict
from cifar100.models import model_spec
from cifar100.recipes.flags import RESUME_FLAGS, config_from_args, refused_on_resume
from cifar100.runs.folders import load_run_config, read_json
from cifar100.runs.lock import claim_resume
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.runtime.device import check_device, select_device
from cifar100.training.train import new_shared_run_dir

# What ``train --resume`` may change; every other flag would be silently dropped: refused.


def refuse_on_resume(run_dir: Path, given: dict[str, Any]) -> None:
    """``--resume`` continues ``run_dir`` with its own settings: fail if any of the other
    flags in ``given`` (flag -> value) was set."""
    refused = [flag for flag, value in given.items() if value not in (None, [], False)]
    if refused:
        raise ConfigError(
            f"--resume continues {run_dir} with its own settings; it "
            f"cannot take {', '.join(refused)} (it accepts "
            f"{', '.join(RESUME_FLAGS)}; for other settings start a new run)"
        )


def config_and_run_dir(args: argparse.Namespace) -> tuple[Config, Path]:
    """What ``cifar100 train`` trains, and where: with ``--resume``, the run's own config
    (refused if another flag was given) in its folder; else the flags' config, in
    ``--run-dir`` or a new folder under runs/ (rank 0's, under torchrun)."""
    if args.resume:
        refuse_on_resume(args.resume, refused_on_resume(args))
        return resume_config(args.resume, args.epochs, args.device, args.data_dir), args.resume
    config = config_from_args(args, "train")
    return config, args.run_dir or new_shared_run_dir(config)


def resume_config(
    run_dir: Path, epochs: int | None = None, device: str | None = None, data_dir: str | None = None
) -> Config:
    """The config to continue ``run_dir`` with: its own, changed only where allowed.

    ``epochs`` extends the run (a finished one too), as torchvision's ``--resume`` with
    ``--epochs``: for a transfer model, every stage not yet finished gets that length.
    ``device`` may change the device, not its type: the saved random state of the
    augmentation belongs to one kind of generator. ``data_dir``: where the data now is.
    """
    claim_resume(run_dir)
    config = load_run_config(run_dir)
    if data_dir is not None:
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, data_dir=data_dir)
        )
    if device is not None:
        _check_device_type(run_dir, check_device(device))
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
    if epochs is not None:
        config = _extend(
            config, load_checkpoint(run_dir / "checkpoints" / "last.pt"), epochs, run_dir
        )
    return config


def _check_device_type(run_dir: Path, device: str) -> None:
    try:
        saved = read_json(run_dir / "run.json")["hardware"]["device"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing recorded: nothing to compare with
    new = select_device(device).type
    if torch.device(saved).type != new:
        raise ConfigError(
            f"{run_dir} was trained on {saved}; its saved random state cannot "
            f"continue on {new}: resume it on a {torch.device(saved).type} device"
        )


def _extend(config: Config, state: dict[str, Any], epochs: int, run_dir: Path) -> Config:
    stage, done, t = state["stage"], state["epoch"], config.transfer
    if not model_spec(config.model.name).pretrained:
        changes, last_stage = {"train": {"epochs": epochs}}, True
    elif stage == "finetune":
        changes, last_stage = {"transfer": {"stage2_epochs": epochs}}, True
    else:
        stages = {
            "stage1_epochs": epochs,
            **({"stage2_epochs": epochs} if t.stage2_epochs > 0 else {}),
        }
        changes, last_stage = {"transfer": stages}, t.stage2_epochs == 0
    if epochs < done:
        raise ConfigError(
            f"{run_dir}: stage '{stage}' has trained {done} epochs already; "
            f"--epochs must be at least {done}"
        )
    patience = config.train.early_stopping
    if epochs > done and last_stage and patience and state["bad_epochs"] >= patience:
        raise ConfigError(
            f"{run_dir}: stopped early ({state['bad_epochs']} epochs without a "
            "better validation top-1); more epochs would stop again at once"
        )
    return from_dict(changes, config)
