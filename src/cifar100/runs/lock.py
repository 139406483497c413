"""Run directories are never clobbered: a lock while a process writes one, and clear rules
for starting in a folder that exists.

- ``train`` into a folder that holds a run refuses; ``--resume`` continues it and
  ``--overwrite`` replaces it (deleting the run's own files only, never anything else).
- While a process writes a run it holds ``RUN_DIR/.lock`` (an exclusive ``flock``, with its
  pid inside for the message). The kernel drops the lock when the process dies, however
  it dies, so a lock left by a killed run is stale and is simply taken over; on file
  systems without ``flock`` the pid decides (a live process on this host keeps it). Two
  processes started on one folder at once: exactly one gets the lock.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cifar100.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the pid alone decides
    fcntl = None

LOCK = ".lock"
# Files that mark a folder as a run (any one of them), and everything a run writes there:
# what --overwrite deletes. Other files in the folder are left alone.
RUN_MARKERS = ("config.yaml", "run.json", "metrics.jsonl", "results.json", "checkpoints")
RUN_OUTPUTS = (
    *RUN_MARKERS,
    "curves.png",
    "tensorboard",
    "calibration.json",
    "report",
    "report-ensemble",
    "model.onnx",
    "model.safetensors",
)


class RunDirError(UserError):
    """A run folder that cannot be used as asked; the message names the way out."""


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_MARKERS)


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/.lock (creating the folder if needed) for the duration of the block.

    A folder this call created and that is still empty at the end is removed again: a run
    that failed before writing anything leaves nothing behind.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(
            f"{run_dir}: cannot create the run folder ({error.strerror or error})"
        ) from None
    path = run_dir / LOCK
    fd = _acquire(path, run_dir)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _acquire(path: Path, run_dir: Path) -> int:
    for _ in range(5):  # retried only when the file was replaced while we locked it
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(f"{run_dir}: cannot write the lock file ({error.strerror})") from None
        if not _lock(fd, path, run_dir):
            continue
        previous = _read_owner(fd)
        if previous:
            print(
                f"note: {path} was left by process {previous}, which no longer holds it "
                "(it ended or was killed): taking over",
                file=sys.stderr,
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        return fd
    raise RunDirError(f"{run_dir}: could not take {path} (other processes keep replacing it)")


def _lock(fd: int, path: Path, run_dir: Path) -> bool:
    """Lock ``fd``; False when ``path`` no longer names it (a holder just released it)."""
    try:
        if fcntl is None:
            raise OSError("no flock")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _busy(fd, run_dir)
    except OSError:  # no flock on this file system: trust the pid in the file
        pid, host = _owner(fd)
        if pid and pid != os.getpid() and host == socket.gethostname() and _alive(pid):
            _busy(fd, run_dir)
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
    return same


def _busy(fd: int, run_dir: Path) -> None:
    owner = _read_owner(fd) or "unknown pid"
    os.close(fd)
    raise RunDirError(
        f"{run_dir}: another process ({owner}) is writing this run; wait for it "
        "to end or choose another --run-dir"
    )


def _read_owner(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


def _owner(fd: int) -> tuple[int | None, str]:
    pid, _, host = _read_owner(fd).partition("@")
    return (int(pid) if pid.isdigit() else None), host


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def describe(run_dir: Path) -> str:
    """'a finished run (test top-1 57.97%)' or 'an unfinished run'."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
        return f"a finished run (test top-1 {results['test_top1']:.2%})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a finished run" if (run_dir / "results.json").exists() else "an unfinished run"


def claim_fresh(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a new run (call it holding the lock), or refuse."""
    entries = [p for p in run_dir.iterdir() if p.name != LOCK]
    if not entries:
        return
    if not holds_run(run_dir):
        raise RunDirError(
            f"{run_dir}: the folder is not empty and holds no run; choose a new "
            "or empty --run-dir (--overwrite only ever replaces a run)"
        )
    if not overwrite and not (run_dir / "checkpoints" / "last.pt").is_file():
        raise RunDirError(
            f"{run_dir}: holds a run that saved no checkpoint (it failed or was "
            f"stopped before its first); start it again with 'cifar100 train "
            f"--resume {run_dir}', or replace it with --overwrite"
        )
    if not overwrite:
        raise RunDirError(
            f"{run_dir}: holds {describe(run_dir)}; continue it with "
            f"'cifar100 train --resume {run_dir}', or replace it with --overwrite"
        )
    for name in RUN_OUTPUTS:
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def claim_resume(run_dir: Path) -> None:
    """Refuse to resume a folder with nothing to resume from."""
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not holds_run(run_dir):
        raise RunDirError(f"{run_dir}: nothing to resume (the folder holds no run)")
    # A run stopped before its first checkpoint (say, while extracting features) resumes
    # from the start with its recorded config: training.prepare_run handles that.
