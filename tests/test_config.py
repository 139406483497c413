"""Settings: parsing, precedence, ranges, honest settings, the shared resolver of presets
and epochs, and the split seed of runs made before it existed."""

from __future__ import annotations

import pytest

from cifar100.cli import build_parser
from cifar100.config.schema import (
    PRESETS_DIR,
    Config,
    ConfigError,
    from_saved,
    layered_config,
    parse_overrides,
    preset_names,
    read_yaml,
    save_config,
    to_dict,
)
from cifar100.recipes.flags import config_from_args
from cifar100.recipes.relevance import check_settings
from cifar100.recipes.resolve import resolve
from cifar100.runs.folders import load_run_config


def _train_config(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["train", *argv]), "train")


def test_precedence_is_preset_then_files_then_set_then_flags(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("optim: {lr: 0.05, weight_decay: 0.001}\ntrain: {epochs: 7, seed: 2}\n")
    second.write_text("optim: {lr: 0.07}\n")
    config = _train_config(
        "--preset",
        "quick",
        "--config",
        str(first),
        "--config",
        str(second),
        "--set",
        "optim.weight_decay=0.002",
        "--set",
        "train.epochs=9",
        "--set",
        "train.seed=3",
        "--seed",
        "4",
    )
    quick = layered_config("quick")
    assert quick.optim.lr == 0.2 and quick.train.epochs == 4  # what the layers replace
    assert config.optim.optimizer == "sgd"  # the preset's, untouched by the files
    assert config.optim.lr == 0.07  # the later file over the earlier one over the preset
    assert config.optim.weight_decay == 0.002  # --set over the file
    assert config.train.epochs == 9  # --set over the file
    assert config.train.seed == 4  # the flag over --set
    assert (
        _train_config(
            "--config", str(first), "--epochs", "11", "--set", "train.epochs=9"
        ).train.epochs
        == 11
    )
    assert config.train.eval_batch_size == Config().train.eval_batch_size  # a default stays


def test_values_are_parsed_into_the_annotated_types():
    config = layered_config(
        overrides=parse_overrides(
            [
                "model.widths=8,16,32",
                "train.early_stopping=none",
                "train.tta_flip=yes",
                "optim.lr=1e-2",
                "optim.grad_clip=null",
                "model.image_size=64",
            ]
        )
    )
    assert config.model.widths == (8, 16, 32) and config.train.early_stopping is None
    assert config.train.tta_flip is True and config.optim.lr == 0.01
    assert config.optim.grad_clip is None and config.model.image_size == 64
    assert layered_config(overrides=parse_overrides(["model.widths=[4, 8]"])).model.widths == (4, 8)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=2.5", "train.epochs: cannot use 2.5"),
        ("train.epochs=true", "train.epochs: cannot use True"),
        ("optim.lr=fast", "optim.lr: cannot use 'fast'"),
        ("train.epochs=0", "train.epochs must be at least 1, got 0"),
        ("data.val_fraction=1", "data.val_fraction must be in (0, 1), got 1"),
        ("optim.lr=-0.1", "optim.lr must be above 0, got -0.1"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("augment.zoom=1.0", "augment.zoom must be in [0, 1)"),
        ("train.seed=-1", "train.seed must be in [0, 4294967295]"),
        ("model.widths=[]", "model.widths must list positive channel counts"),
        ("model.widths=8,0", "model.widths must list positive channel counts"),
        ("transfer.stage2_unfreeze=20", "transfer.stage2_unfreeze must be in [0, 19]"),
        (
            "optim.optimizer=adamz",
            "unknown optim.optimizer 'adamz' (choose from adam, adamw, sgd, muon)",
        ),
        ("optim.schedule=zigzag", "(choose from plateau, cosine, onecycle, constant)"),
        ("optim.nosuch=1", "unknown setting 'optim.nosuch' (settings of 'optim': optimizer, lr"),
        ("nosuch.key=1", "unknown config section 'nosuch' (choose from model, data"),
        ("train.epochs", "must look like section.key=value"),
        ("model.widths=[1,2", "the value is not valid YAML"),
    ],
)
def test_bad_values_are_rejected_with_their_name(override, message):
    with pytest.raises(ConfigError) as error:
        layered_config(overrides=parse_overrides([override]))
    assert message in str(error.value)


def test_config_files_that_do_not_fit_name_the_file(tmp_path):
    cases = {
        "list.yaml": "- a\n- b\n",
        "scalar.yaml": "train: 5\n",
        "broken.yaml": "train: {epochs: [\n",
        "range.yaml": "train: {epochs: 0}\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            layered_config(files=[tmp_path / name])
    with pytest.raises(ConfigError, match="cannot read"):
        layered_config(files=[tmp_path])  # a folder
    with pytest.raises(ConfigError, match="unknown preset 'nope' \\(choose from cnn-fast"):
        layered_config("nope")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_sets_only_what_takes_effect(name):
    """Presets obey the honest-settings rule with every key they set counted as set."""
    values = read_yaml(PRESETS_DIR / f"{name}.yaml")
    keys = {f"{section}.{key}" for section, settings in values.items() for key in settings}
    check_settings(layered_config(name), keys)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_with_an_ema_sizes_it_to_the_run(name):
    """A fixed decay is sized for one length of run: 0.999 still remembers the random
    start after a short one. A preset's average spans a share of its own steps instead."""
    train = layered_config(name).train
    assert train.ema_decay is None, f"{name}: train.ema_decay={train.ema_decay}; use ema_span"
    if train.ema_span is not None:
        assert train.ema_span <= 0.2, f"{name}: an average over {train.ema_span} of the run"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "mobilenetv2", "--set", "optim.lr=0.1"], "transfer.stage1_lr"),
        (["--model", "mobilenetv2", "--set", "train.epochs=3"], "--epochs for every stage"),
        (["--model", "mobilenetv2", "--set", "train.ema_decay=0.99"], "no moving average"),
        (["--model", "mobilenetv2", "--set", "augment.translate=4"], "cached features"),
        (["--model", "mobilenetv2", "--set", "train.batch_size=32"], "stage 2, which is off"),
        (["--model", "mobilenetv2", "--set", "optim.warmup_epochs=1"], "stage2_warmup_epochs"),
        (["--model", "cnn-seed", "--set", "transfer.stage1_lr=0.1"], "trained from scratch"),
        (["--model", "cnn-fast", "--set", "model.head_hidden=64"], "trained from scratch"),
        (["--preset", "quick", "--set", "optim.plateau_patience=2"], "schedule is 'onecycle'"),
        (["--preset", "cnn-seed", "--set", "optim.warmup_epochs=2"], "plateau schedule has no"),
        (["--preset", "cnn-seed", "--set", "optim.momentum=0.5"], "optimizer is 'adam'"),
        (["--model", "cnn-seed", "--set", "model.widths=8,16"], "cnn-seed takes 3 widths"),
        (["--model", "cnn-fast", "--set", "model.widths=8,8,8,8,8"], "1 to 4 widths"),
        (["--model", "mobilenetv2", "--set", "optim.optimizer=muon"], "pretrained filters"),
        (["--preset", "quick", "--set", "optim.muon_lr=0.1"], "they apply to muon"),
        (["--model", "resnet9000"], "unknown model 'resnet9000' (choose from cnn-fast, cnn-seed"),
        (["--preset", "quick", "--train-subset", "100"], "fewer than one batch"),
    ],
)
def test_settings_that_would_do_nothing_are_rejected(argv, message):
    with pytest.raises(ConfigError) as error:
        _train_config(*argv)
    assert message in str(error.value)


def test_settings_that_take_effect_pass():
    stage2 = _train_config(
        "--model",
        "mobilenetv2",
        "--set",
        "transfer.stage2_epochs=2",
        "--set",
        "train.batch_size=32",
        "--set",
        "augment.translate=8",
    )
    assert stage2.train.batch_size == 32 and stage2.augment.translate == 8
    uncached = _train_config(
        "--model",
        "mobilenetv2",
        "--set",
        "transfer.cache_features=false",
        "--set",
        "augment.flip=false",
        "--set",
        "augment.rotation=10",
    )
    assert uncached.augment.rotation == 10
    assert (
        _train_config(
            "--preset", "cnn-seed", "--set", "optim.plateau_patience=5"
        ).optim.plateau_patience
        == 5
    )


def test_a_full_config_dump_counts_only_its_changes(tmp_path):
    """A study's best.yaml restates every default; only its changed values are 'set'."""
    path = tmp_path / "best.yaml"
    save_config(layered_config("mobilenetv2"), path)
    assert resolve(None, [path]).model.name == "mobilenetv2"
    values = to_dict(layered_config("mobilenetv2"))
    values["optim"]["lr"] = 0.5  # a changed value that stage 1 would ignore
    path.write_text(__import__("yaml").safe_dump(values))
    with pytest.raises(ConfigError, match="optim.lr"):
        resolve(None, [path])


def test_epochs_mean_each_switched_on_stage_in_train_and_tune():
    """One resolver: the preset's stage 2 decides, never the preset's name."""
    stage1 = _train_config("--model", "mobilenetv2", "--epochs", "3")
    assert (stage1.transfer.stage1_epochs, stage1.transfer.stage2_epochs) == (3, 0)
    both = _train_config("--preset", "mobilenetv2-finetune", "--epochs", "3")
    assert (both.transfer.stage1_epochs, both.transfer.stage2_epochs) == (3, 3)
    assert both.train.epochs == Config().train.epochs  # not a transfer model's setting
    assert _train_config("--model", "cnn-seed", "--epochs", "3").train.epochs == 3
    for preset, expected in (("mobilenetv2", (3, 0)), ("mobilenetv2-finetune", (3, 3))):
        args = build_parser().parse_args(["tune", "--preset", preset, "--epochs", "3"])
        base = config_from_args(args, "tune")
        assert (base.transfer.stage1_epochs, base.transfer.stage2_epochs) == expected
    args = build_parser().parse_args(["tune", "--preset", "quick", "--epochs", "2"])
    assert config_from_args(args, "tune").train.epochs == 2


def test_split_seed_defaults_to_zero_and_old_runs_keep_theirs(tmp_path):
    assert Config().data.split_seed == 0
    old = to_dict(Config())
    del old["data"]["split_seed"]  # a config.yaml written before data.split_seed existed
    old["train"]["seed"] = 3
    assert from_saved(old).data.split_seed == 3  # its split was drawn with train.seed
    (tmp_path / "config.yaml").write_text(__import__("yaml").safe_dump(old))
    assert load_run_config(tmp_path).data.split_seed == 3
    new = to_dict(Config())
    new["train"]["seed"] = 3
    assert from_saved(new).data.split_seed == 0  # a new run's split ignores train.seed
    assert _train_config("--seed", "5").data.split_seed == 0
