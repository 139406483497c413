"""SIGINT (Ctrl-C) and SIGTERM (batch schedulers, ``docker stop``, ``timeout``): stop within
seconds in every phase, keep what can be kept, and exit 130 or 143 with one line.

Two modes. By default a signal raises :class:`Interrupted` at once, wherever the program
is: downloads, feature extraction and evaluations catch it only to save or clean up, then
let it go. Inside :func:`deferred` (a training stage) the first signal only sets a flag, so
that the loop can finish its step and write a checkpoint it can resume exactly; the loop
polls :func:`requested`. A second signal always raises at once: "stop now" means now.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells do


class Interrupted(KeyboardInterrupt):  # noqa: N818  (reads as what happened, like the base)
    """The process was asked to stop. ``detail`` says what was saved and how to continue."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = "nothing was saved"):
        super().__init__(detail)
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def interrupted(stop: KeyboardInterrupt, detail: str) -> Interrupted:
    """``stop`` (ours, or Python's own Ctrl-C in a notebook) with what was saved and how to
    continue."""
    return Interrupted(getattr(stop, "signum", signal.SIGINT), detail)


_state = {"signum": None, "deferring": 0, "installed": False}


def install() -> None:
    """Route SIGINT and SIGTERM through this module (main thread only; idempotent)."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        signal.signal(signum, _handle)
    _state["installed"] = True


def _handle(signum: int, frame) -> None:
    if _state["signum"] is not None or not _state["deferring"]:
        _state["signum"] = signum
        raise Interrupted(signum)
    _state["signum"] = signum
    print(
        f"\n{signal.Signals(signum).name}: stopping after this step and saving a "
        "checkpoint (send it again to stop at once)...",
        file=sys.stderr,
        flush=True,
    )


def requested() -> int | None:
    """The signal asked for a stop, if any (what a deferring loop polls between steps)."""
    return _state["signum"]


def check() -> None:
    """Raise :class:`Interrupted` if a stop was asked for (for loops that poll)."""
    if _state["signum"] is not None:
        raise Interrupted(_state["signum"])


def reset() -> None:
    """Forget an earlier request (a library caller that handled it and goes on)."""
    _state["signum"] = None


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block the first signal sets a flag instead of raising.

    Where nothing installed the handlers yet (the Python API, a notebook), they are
    installed for the block only and the caller's own handlers come back afterwards.
    """
    previous = None
    if not _state["installed"] and threading.current_thread() is threading.main_thread():
        previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        install()
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        if previous is not None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _state["installed"] = False
