"""CPU time and page faults around a measurement, and the allocator setting to run under.

Images/s alone hid a regression once (issue 17): glibc handed every activation buffer back
to the kernel, and the time went to system CPU and page faults. Every benchmark prints
these beside its rates, so that cannot come back unseen.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from cifar100.runtime.allocator import ENV, GLIBC_ENV, tune_allocator


@dataclass
class Usage:
    user: float = 0.0  # CPU seconds in the process (all threads)
    system: float = 0.0  # CPU seconds in the kernel on the process's behalf
    faults: int = 0  # minor page faults

    def add(self, other: Usage) -> None:
        self.user, self.system = self.user + other.user, self.system + other.system
        self.faults += other.faults

    def __str__(self) -> str:
        share = self.system / self.user if self.user else 0.0
        return (
            f"user {self.user:6.1f} s, sys {self.system:5.1f} s ({share:4.0%} of user), "
            f"{self.faults / 1e6:5.2f} M faults"
        )


def _now() -> Usage:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(r.ru_utime, r.ru_stime, r.ru_minflt)


@contextmanager
def measured(total: Usage):
    """Add the CPU time and faults of the ``with`` body to ``total``."""
    start = _now()
    try:
        yield total
    finally:
        end = _now()
        total.add(
            Usage(end.user - start.user, end.system - start.system, end.faults - start.faults)
        )


# "environ": the same thresholds as environment variables read by glibc at start-up (the
# mechanism issue 17 measured), to compare with the in-process mallopt the project uses.
SETTINGS = ("default", "tuned", "environ")


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allocator",
        choices=[*SETTINGS, "both", "all"],
        default="tuned",
        help="malloc setting: glibc's 'default', the project's 'tuned' "
        "(cifar100.runtime.allocator, mallopt), 'environ' (MALLOC_*_ variables); "
        "'both' = default + tuned, 'all' = the three, one after the other",
    )


def apply_allocator(setting: str) -> str:
    """Set the allocator as asked before any large allocation; return its description."""
    os.environ[ENV] = "default" if setting == "default" else "tuned"
    return tune_allocator()


def run_settings(argv: list[str], which: str) -> int:
    """Run this script once per allocator setting, in fresh processes (glibc reads its
    settings at start-up), so the tables come from one command on one machine state."""
    code = 0
    for setting in ("default", "tuned") if which == "both" else SETTINGS:
        print(f"===== allocator: {setting} =====", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in GLIBC_ENV}
        if setting == "environ":
            env.update(GLIBC_ENV)
        code |= subprocess.call(
            [sys.executable, sys.argv[0], *_without_allocator(argv), "--allocator", setting],
            env=env,
        )
        print(flush=True)
    return code


def _without_allocator(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--allocator="):
            skip = False
            continue
        skip = arg == "--allocator"
        if not skip:
            kept.append(arg)
    return kept
