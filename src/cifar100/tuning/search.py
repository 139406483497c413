"""Hyperparameter search with Optuna: TPE sampling, median pruning, a study in SQLite.

Every trial is an ordinary ``train()`` run in ``STUDY_DIR/trials/trial-NNNN/`` that sees
only the train and validation splits: the objective is the best validation top-1, and the
test set is never evaluated (``test_set=False``), so it stays an unbiased final check.

The study lives in ``STUDY_DIR/study.db`` and is opened with ``load_if_exists``: a killed
``cifar100 tune`` continues where it stopped, and several processes (or machines sharing
the folder) can work on one study at once. ``--trials N`` is the number of finished
(complete or pruned) trials the study should hold; each worker tops it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import warnings
from pathlib import Path
from typing import Any

from cifar100.config.schema import Config, ConfigError, from_saved, to_dict
from cifar100.errors import UserError
from cifar100.models import model_spec
from cifar100.models.cnn import FastCNN, SeedCNN
from cifar100.runtime import stopping
from cifar100.training.engine import TrainingDiverged
from cifar100.training.train import train
from cifar100.tuning.report import STUDY_NAME, finished, write_study_summary

try:
    import optuna
except ImportError:  # an optional dependency: cifar100[tune]
    optuna = None

DEFAULT_WIDTHS = {
    "cnn-seed": tuple(w for w, *_ in SeedCNN.STAGES),
    "cnn-fast": tuple(w for w, *_ in FastCNN.STAGES),
}
# Augmentation strength 1.0: the coursework recipe's rotation/zoom/contrast plus a 4 px
# random crop. A trial scales all four together, so one number says "how much".
AUGMENT_AT_1 = {"translate": 4, "rotation": 15.0, "zoom": 0.1, "contrast": 0.1}


class TuneError(UserError):
    """A study that cannot be run as asked; the message names the file or the setting."""


def require_optuna() -> None:
    if optuna is None:
        raise TuneError("cifar100 tune needs Optuna: pip install 'cifar100[tune]'")


def sample_params(trial, base: Config) -> dict[str, float]:
    """The search space, centred on the base recipe where it has a natural scale."""
    pretrained = model_spec(base.model.name).pretrained
    lr = base.transfer.stage1_lr if pretrained else base.optim.lr
    params = {
        "lr": trial.suggest_float("lr", lr / 10, lr * 10, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 5e-2, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.3),
    }
    t = base.transfer
    if not (pretrained and t.cache_features and t.stage2_epochs == 0):
        # (stage 1 alone, on cached features, has no augmentation to strengthen)
        params["augment"] = trial.suggest_float("augment", 0.0, 1.5)
    if not pretrained and (base.model.widths or base.model.name in DEFAULT_WIDTHS):
        # (ImageNet weights fix a pretrained model's widths)
        params["width"] = trial.suggest_float("width", 0.5, 1.5, step=0.25)
    return params


def apply_params(base: Config, params: dict[str, float]) -> Config:
    """The trial's config: ``base`` with the sampled values written in."""
    optim = dataclasses.replace(
        base.optim, weight_decay=params["weight_decay"], label_smoothing=params["label_smoothing"]
    )
    transfer, model = base.transfer, dataclasses.replace(base.model, dropout=params["dropout"])
    if model_spec(base.model.name).pretrained:  # both stages keep their lr ratio
        factor = params["lr"] / base.transfer.stage1_lr
        transfer = dataclasses.replace(
            transfer, stage1_lr=params["lr"], stage2_lr=base.transfer.stage2_lr * factor
        )
    else:
        optim = dataclasses.replace(optim, lr=params["lr"])
    if "width" in params:
        widths = base.model.widths or DEFAULT_WIDTHS[base.model.name]
        model = dataclasses.replace(
            model, widths=tuple(max(4, round(w * params["width"] / 4) * 4) for w in widths)
        )  # multiples of 4
    augment = base.augment
    if "augment" in params:
        s = params["augment"]
        augment = dataclasses.replace(
            augment,
            translate=round(AUGMENT_AT_1["translate"] * s),
            rotation=AUGMENT_AT_1["rotation"] * s,
            zoom=AUGMENT_AT_1["zoom"] * s,
            contrast=AUGMENT_AT_1["contrast"] * s,
        )
    return dataclasses.replace(base, optim=optim, model=model, augment=augment, transfer=transfer)


def objective(trial, base: Config, study_dir: Path) -> float:
    """Train one trial; report validation top-1 every epoch so the pruner can stop it."""
    config = apply_params(base, sample_params(trial, base))
    run_dir = study_dir / "trials" / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("config", to_dict(config))
    epochs = itertools.count(1)  # one step per epoch, across stages

    def report(row: dict[str, Any]) -> None:
        step = next(epochs)
        trial.report(row["val_top1"], step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation top-1 {row['val_top1']:.3f} at epoch {step}")

    try:
        # A trial's folder belongs to the study (its number is never reused): one left by
        # a deleted study.db is replaced, not refused.
        results = train(config, run_dir, on_epoch=report, test_set=False, overwrite=True)
    except TrainingDiverged:  # a legitimate outcome of a too-high learning rate
        trial.set_user_attr("diverged", True)
        return 0.0
    except KeyboardInterrupt:  # stopped: Optuna marks it failed; the rerun tries it again
        trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise
    return results["val_top1"]


class _NoInterruptTracebacks(logging.Filter):
    """Optuna logs a stopped trial's KeyboardInterrupt with its traceback; our one line says
    what happened instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.exc_info
            and record.exc_info[0]
            and issubclass(record.exc_info[0], KeyboardInterrupt)
        )


def quiet_interrupts() -> None:
    """Optuna's own log down to warnings, without the traceback of an interrupted trial."""
    require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    handler = logging.StreamHandler()
    handler.addFilter(_NoInterruptTracebacks())
    optuna.logging.get_logger("optuna").addHandler(handler)


def open_study(study_dir: Path, base: Config, seed: int = 0):
    """Create or reopen ``study_dir/study.db``; a reopened study must keep its base recipe."""
    require_optuna()
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TuneError(f"{study_dir}: cannot create the study folder ({error.strerror})") from None
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    try:
        # Heartbeats let a restarted or parallel worker mark a killed one's trials FAIL.
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's terms
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                f"sqlite:///{study_dir / 'study.db'}", heartbeat_interval=60, grace_period=180
            )
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            direction="maximize",
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as error:  # SQLAlchemy raises many kinds for a file that is no study
        raise TuneError(
            f"{study_dir / 'study.db'}: not a readable Optuna study ({type(error).__name__})"
        ) from None
    _check_base(study, base, study_dir)
    # Seeded, and shifted by the trials already there: a restarted worker does not
    # repeat the first worker's random start-up points.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=5)
    return study


def _comparable(config: Config) -> dict[str, Any]:
    values = to_dict(config)
    values["data"].pop("data_dir")  # the data may live elsewhere on another worker
    return values


def _check_base(study, base: Config, study_dir: Path) -> None:
    stored = study.user_attrs.get("base_config")
    if stored is None:
        study.set_user_attr("base_config", _comparable(base))
        return
    # Settings added since the study began count as their defaults (a stored config that
    # no longer loads is compared as it is: whatever differs is named below).
    with contextlib.suppress(ConfigError):
        stored = _comparable(from_saved(stored))
    mine = _comparable(base)
    changed = [f"{s}.{k}" for s in mine for k in mine[s] if stored.get(s, {}).get(k) != mine[s][k]]
    if changed:
        raise TuneError(
            f"{study_dir / 'study.db'}: this study was started with another base "
            f"recipe (differs in {', '.join(changed)}); use the same options or "
            "another --study-dir"
        )


def run_study(
    study_dir: Path,
    base: Config,
    trials: int,
    timeout_minutes: float | None = None,
    seed: int = 0,
    on_trial=None,
):
    """Run trials until the study holds ``trials`` finished ones (or the timeout)."""
    if base.train.refit:
        raise ConfigError(
            "train.refit: tuning selects on the validation split, and a refit has none "
            "(refit the recipe the study found, with cifar100 train --refit)"
        )
    study = open_study(study_dir, base, seed)

    def after_trial(study, trial) -> None:
        write_study_summary(study, study_dir)
        if on_trial is not None:
            on_trial(study, trial)
        if finished(study) >= trials:  # counts the trials of parallel workers too
            study.stop()

    remaining = trials - finished(study)
    if remaining > 0:
        try:
            study.optimize(
                lambda t: objective(t, base, study_dir),
                n_trials=remaining,
                timeout=timeout_minutes * 60 if timeout_minutes else None,
                callbacks=[after_trial],
                gc_after_trial=True,
            )
        except KeyboardInterrupt as stop:  # SIGINT/SIGTERM, in a trial or between trials
            raise stopping.interrupted(
                stop,
                f"{study_dir / 'study.db'} keeps the finished "
                "trials: rerun the same command to continue",
            ) from None
    write_study_summary(study, study_dir)
    return study
