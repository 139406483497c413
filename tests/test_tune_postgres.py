"""``cifar100 tune --storage postgresql://...``: one study, filled by several workers.

A real PostgreSQL server (Debian's ``postgresql`` package, which ``scripts/test.sh``
installs) is started by the test in a temporary folder, listening on 127.0.0.1 only; the
workers are real ``cifar100 tune`` processes on the fake data.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import free_port

from cifar100.tuning.search import HEARTBEAT_ENV

TINY = ["--epochs", "2", "--set", "model.widths=8,16,32", "--set", "train.batch_size=64"]
HEARTBEAT = 1  # seconds: a killed worker's trial is stale after 3


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL not found: install it (apt-get install -y postgresql)")
    return Path(found[-1]).parent


class Postgres:
    """A throwaway server: initdb, pg_ctl start, one database per test."""

    def __init__(self, folder: Path) -> None:
        self.bin, self.folder, self.port = _postgres_bin(), folder, free_port()
        # PostgreSQL refuses to run as root: then the package's `postgres` user runs it.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(folder, "postgres")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{tool}: {result.stdout}{result.stderr}"

    def start(self) -> None:
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "cifar100", "--auth=trust", "-E", "UTF8")
        options = (
            f"-k {self.folder} -p {self.port} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=50"
        )
        self._run(
            "pg_ctl", "start", "-w", "-D", str(data), "-l", str(self.folder / "log"), "-o", options
        )

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-m", "immediate", "-D", str(self.folder / "data"))

    def database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "cifar100", name)
        return f"postgresql://cifar100@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    # Not tmp_path: pytest's temporary root is private to its user, and the server runs as
    # `postgres` when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="cifar100-pg-"))
    server = Postgres(folder)
    try:
        server.start()
        yield server
        server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        HEARTBEAT_ENV: str(HEARTBEAT),
    }


def _tune(data_dir: Path, study_dir: Path, url: str, trials: int, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cifar100",
        "tune",
        "--storage",
        url,
        "--trials",
        str(trials),
        "--study-dir",
        str(study_dir),
        "--data-dir",
        str(data_dir),
        "--seed",
        str(seed),
        *TINY,
    ]


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url.replace("postgresql:", "postgresql+psycopg2:"))
    try:
        return optuna.load_study(study_name="cifar100", storage=storage).get_trials()
    except KeyError:  # the first worker has not created the study yet
        return []
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _trial_numbers(stdout: str) -> list[int]:
    """The trials a worker ran, from its lines ``trial N complete: ...`` (or ``pruned``)."""
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("trial ")]


def test_two_workers_fill_one_study(postgres, fake_data_dir, tmp_path):
    url, trials = postgres.database("parallel"), 4
    workers = [
        subprocess.Popen(
            # each its own study folder, as on two machines; each its own sampler seed
            _tune(fake_data_dir, tmp_path / f"machine-{i}", url, trials, seed=i),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]

    # Finished as the study counts them: complete, or pruned by the median rule (which a
    # slow trial on a busy machine can be).
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = [t for t in _trials(url) if t.state in finished]
    # At least the trials asked for; a worker that starts its last trial while the other
    # finishes the last missing one may add one more.
    assert trials <= len(done) <= trials + 1
    ran = [_trial_numbers(stdout) for stdout, _ in outputs]
    assert all(ran), "both workers ran trials"
    assert sorted(ran[0] + ran[1]) == sorted(t.number for t in done)  # none twice, none lost
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done)
    for worker, numbers in enumerate(ran):  # each trial trained where its worker runs
        folder = tmp_path / f"machine-{worker}" / "trials"
        assert sorted(int(p.name.split("-")[1]) for p in folder.iterdir()) == sorted(numbers)
    summary = (tmp_path / "machine-0" / "summary.csv").read_text()
    assert summary.count("complete") + summary.count("pruned") >= len(ran[0])


def test_a_killed_workers_trial_is_marked_failed(postgres, fake_data_dir, tmp_path):
    url = postgres.database("killed")
    worker = subprocess.Popen(
        _tune(fake_data_dir, tmp_path / "first", url, trials=10, seed=0),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, running = time.monotonic() + 120, []
    while not running and time.monotonic() < deadline:
        assert worker.poll() is None  # the worker must not die on its own
        running = [
            t
            for t in _trials(url)
            if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values
        ]
        time.sleep(0.05)
    assert running, "no trial reached its first epoch"
    worker.send_signal(signal.SIGKILL)  # mid-trial, no chance to clean up: a crash
    worker.wait()
    killed = running[0].number
    time.sleep(3 * HEARTBEAT + 0.5)  # its heartbeat goes stale
    assert {t.number: t.state for t in _trials(url)}[killed] == optuna.trial.TrialState.RUNNING

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = sum(t.state in counted for t in _trials(url))  # as the study counts them
    other = subprocess.run(
        _tune(fake_data_dir, tmp_path / "second", url, trials=finished + 1, seed=1),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert other.returncode == 0, other.stderr[-3000:]
    states = {t.number: t.state for t in _trials(url)}
    assert states[killed] == optuna.trial.TrialState.FAIL
    assert list(states.values()).count(optuna.trial.TrialState.RUNNING) == 0
    assert f"finished trials in postgresql://cifar100@127.0.0.1:{postgres.port}/killed" in (
        other.stdout
    )


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path):
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar100",
            "tune",
            "--storage",
            f"postgresql://me:s3cret@127.0.0.1:{port}/study",
            "--study-dir",
            str(tmp_path / "study"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"cifar100: error: postgresql://me:***@127.0.0.1:{port}/study")
    assert "Connection refused" in result.stderr and "s3cret" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "study").exists()  # a failed start leaves no folder
