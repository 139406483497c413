"""MLflow, opt-in (``--set track.mlflow=URI``): a run on the fake data logged to a local
file store, read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cifar100.config.schema import Config, flat_settings

TINY = ["--epochs", "2", "--set", "model.widths=8,16,32"]


def _train(data_dir: Path, run_dir: Path, *extra: str, env: dict | None = None):
    """``cifar100 train`` on the fake data, in ``env`` (default: this one's)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "train",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(run_dir),
            *TINY,
            *extra,
        ],
        env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_run_logged_to_a_file_store_has_params_metrics_and_record(
    fake_data_dir, tmp_path, monkeypatch
):
    store, run_dir = f"file:{tmp_path / 'mlruns'}", tmp_path / "run"
    # Unset: MLflow 3 refuses a file store without it, and naming one must be enough.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    result = _train(fake_data_dir, run_dir, "--set", f"track.mlflow={store}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"logged to MLflow at {store}" in result.stderr

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it back here
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("cifar100")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir.resolve())

    config = json.loads(json.dumps(flat_settings(Config())))  # every setting is a param
    assert set(run.data.params) == set(config)
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["model.widths"] == "[8, 16, 32]"

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_top1", "val_top5", "lr", "elapsed_s"):
        history = client.get_metric_history(run.info.run_id, f"main/{key}")
        assert sorted((m.step, m.value) for m in history) == [(r["epoch"], r[key]) for r in rows]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test_top1", "test_top5", "test_loss", "val_top1"):
        assert run.data.metrics[f"final/{key}"] == results[key]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "run.json", "results.json", "metrics.jsonl", "curves.png"}
    local = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == results


def test_asking_for_mlflow_without_the_package_is_refused_before_training(fake_data_dir, tmp_path):
    shadow = tmp_path / "shadow" / "mlflow"  # an installation without the package
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named mlflow')\n")
    path = os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    run_dir = tmp_path / "run"
    result = _train(
        fake_data_dir,
        run_dir,
        "--set",
        "track.mlflow=file:./mlruns",
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "cifar100: error: track.mlflow=file:./mlruns: needs the mlflow package: "
        "pip install 'cifar100[track]'"
    ]
    assert not run_dir.exists()  # refused before the folder was made


def test_a_store_that_cannot_be_written_warns_and_keeps_the_run(tiny_run, tmp_path, capsys):
    from cifar100.runs.tracking import log_run_or_warn

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (tmp_path / "blocked").write_text("a file where the store's folder should be\n")
    results = json.loads((run_dir / "results.json").read_text())
    store = f"file:{tmp_path / 'blocked' / 'mlruns'}"
    log_run_or_warn(run_dir, store, results, flat_settings(Config()))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: could not log the run to MLflow at")
    assert lines[0].endswith("the run folder is complete")
    assert json.loads((run_dir / "results.json").read_text()) == results


@pytest.mark.parametrize("uri", ["mlruns", "ftp://host/x", ""])
def test_a_tracking_setting_that_is_no_uri_names_the_setting(uri):
    from cifar100.config.schema import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"^track\.mlflow must be a tracking URI"):
        from_dict({"track": {"mlflow": uri}})
