"""Hyperparameter search with Optuna: TPE sampling, median pruning, a study in a database.

Every trial is an ordinary ``train()`` run in ``STUDY_DIR/trials/trial-NNNN/`` that sees
only the train and validation splits: the objective is the best validation top-1, and the
test set is never evaluated (``test_set=False``), so it stays an unbiased final check.

The study lives in ``STUDY_DIR/study.db`` (SQLite), or in the database that ``--storage URL``
names (PostgreSQL, MySQL: any SQLAlchemy URL Optuna accepts), and is opened with
``load_if_exists``: a killed ``cifar100 tune`` continues where it stopped, and several
processes (or machines sharing the database) can work on one study at once. ``--trials N``
is the number of finished (complete or pruned) trials the study should hold; each worker
tops it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

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
# Seconds between a worker's heartbeats; a trial silent for three of them belongs to a
# killed worker, and the next worker to start a trial marks it FAIL.
HEARTBEAT_SECONDS = 60
HEARTBEAT_ENV = "CIFAR100_TUNE_HEARTBEAT"


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


def storage_label(study_dir: Path, storage: str | None = None) -> str:
    """Where the study lives, for messages: the SQLite file, or the URL without its password."""
    if storage is None:
        return str(study_dir / "study.db")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except ArgumentError:
        raise TuneError(  # not echoed: a mistyped URL may still hold a password
            "--storage: not a database URL (expected e.g. postgresql://USER:PASSWORD@HOST/DATABASE)"
        ) from None


def database_url(study_dir: Path, storage: str | None = None) -> str:
    """The SQLAlchemy URL of the study. A bare ``postgresql://`` means psycopg2, the driver
    the ``tune`` extra installs (SQLAlchemy 2.1 would otherwise look for psycopg 3)."""
    if storage is None:
        return f"sqlite:///{study_dir / 'study.db'}"
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    return url.render_as_string(hide_password=False)


def heartbeat() -> tuple[int, int]:
    """Seconds between heartbeats, and the silence after which a running trial is FAIL."""
    value = os.environ.get(HEARTBEAT_ENV, str(HEARTBEAT_SECONDS))
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise TuneError(f"{HEARTBEAT_ENV}={value!r}: expected whole seconds above 0")
    return seconds, 3 * seconds


def _first_line(error: Exception) -> str:
    """A database error's own words: SQLAlchemy's wrapper adds the SQL and a link."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _rdb_storage(url: str, interval: int, grace: int, attempts: int = 5):
    """Optuna's storage on ``url``, its tables created if missing. Workers started together
    on a new database race to create them, and all but one fail: those try again."""
    import sqlalchemy.exc

    for attempt in range(1, attempts + 1):
        try:
            # Heartbeats let a restarted or parallel worker mark a killed one's trials FAIL.
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's terms
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=interval, grace_period=grace
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            text = str(error)
            if attempt == attempts or not ("duplicate" in text or "already exists" in text):
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _make_folder(study_dir: Path) -> None:
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TuneError(f"{study_dir}: cannot create the study folder ({error.strerror})") from None


def open_study(study_dir: Path, base: Config, seed: int = 0, storage: str | None = None):
    """Create or reopen the study (``study_dir/study.db``, or the ``storage`` database URL);
    a reopened study must keep its base recipe."""
    require_optuna()
    where = storage_label(study_dir, storage)
    if storage is None:  # SQLite creates study.db in it
        _make_folder(study_dir)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    interval, grace = heartbeat()
    try:
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=_rdb_storage(database_url(study_dir, storage), interval, grace),
            direction="maximize",
            pruner=pruner,
            load_if_exists=True,
        )
    except ImportError as error:  # the URL names a database whose driver is not installed
        missing = getattr(error.__cause__, "name", None) or error.name or "for it"
        raise TuneError(
            f"{where}: the database driver {missing} is missing "
            "(pip install 'cifar100[tune]' brings PostgreSQL's, psycopg2)"
        ) from None
    except Exception as error:  # SQLAlchemy raises many kinds for a file that is no study
        if storage is None:
            raise TuneError(
                f"{where}: not a readable Optuna study ({type(error).__name__})"
            ) from None
        raise TuneError(f"{where}: cannot open the study ({_first_line(error)})") from None
    _check_base(study, base, where)
    _make_folder(study_dir)  # trials and summaries: a --storage that failed made none
    study.sampler = optuna.samplers.TPESampler(
        seed=sampler_seed(seed, len(study.trials)), n_startup_trials=5
    )
    return study


def sampler_seed(seed: int, trials_before: int) -> int:
    """The sampler's seed, drawn from ``--seed`` and the trials already in the study: a
    restarted worker does not repeat the first one's random start-up points, and workers
    with different seeds never share one (as ``seed + trials_before`` would: seed 1 on an
    empty study, seed 0 one trial later)."""
    return int(np.random.SeedSequence([seed, trials_before]).generate_state(1)[0])


def _comparable(config: Config) -> dict[str, Any]:
    values = to_dict(config)
    values["data"].pop("data_dir")  # the data may live elsewhere on another worker
    values.pop("track", None)  # where a worker also logs its trials changes no trial
    return values


def _check_base(study, base: Config, where: str) -> None:
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
            f"{where}: this study was started with another base "
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
    storage: str | None = None,
):
    """Run trials until the study holds ``trials`` finished ones (or the timeout).

    ``storage`` is a database URL for the study; by default ``study_dir/study.db``.
    """
    if base.train.refit:
        raise ConfigError(
            "train.refit: tuning selects on the validation split, and a refit has none "
            "(refit the recipe the study found, with cifar100 train --refit)"
        )
    study = open_study(study_dir, base, seed, storage)

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
                f"{storage_label(study_dir, storage)} keeps the finished "
                "trials: rerun the same command to continue",
            ) from None
    write_study_summary(study, study_dir)
    return study
