"""train.compile_mode: the mode reaches torch.compile from the config and the training loop,
and a mode torch does not have is refused when it is set, naming the setting."""

from __future__ import annotations

import pytest
import torch

from cifar100.cli import main
from cifar100.config.schema import ConfigError, layered_config
from cifar100.runtime.speed import compile_model


@pytest.fixture
def compile_calls(monkeypatch) -> list[dict]:
    """torch.compile replaced by a recorder that hands the model back uncompiled."""
    calls: list[dict] = []

    def recording(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", recording)
    return calls


def test_compile_model_passes_the_mode_on(compile_calls):
    model = torch.nn.Linear(2, 2)
    assert compile_model(model) is model
    assert compile_model(model, "reduce-overhead") is model
    assert [call["mode"] for call in compile_calls] == ["default", "reduce-overhead"]
    with pytest.raises(ConfigError, match="train.compile_mode='fast': choose one of default"):
        compile_model(model, "fast")


def test_an_unknown_mode_is_refused_when_set():
    assert layered_config("quick").train.compile_mode == "default"  # no default changed
    with pytest.raises(ConfigError, match="train.compile_mode"):
        layered_config("quick", overrides={"train": {"compile_mode": "fastest"}})


def test_training_compiles_in_the_configured_mode(fake_data_dir, tmp_path, compile_calls):
    tiny = ["--epochs", "1", "--train-subset", "200", "--set", "model.widths=[8,16,32,32]"]
    code = main(
        [
            "train",
            "--preset",
            "quick",
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(tmp_path / "run"),
            *tiny,
            "--set",
            "train.batch_size=100",
            "--set",
            "train.compile=true",
            "--set",
            "train.compile_mode=max-autotune-no-cudagraphs",
        ]
    )
    assert code == 0
    assert [call["mode"] for call in compile_calls] == ["max-autotune-no-cudagraphs"]
