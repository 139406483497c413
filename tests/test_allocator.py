"""The allocator setting: freed activation-sized buffers are reused, not faulted in again.

Measured as minor page faults (counts, not seconds: robust on a shared machine) in a fresh
process that allocates and frees a 64 MB tensor repeatedly, as a forward pass does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cifar100.runtime import allocator

PROBE = """
import json, resource
from cifar100.runtime.allocator import tune_allocator
setting = tune_allocator()
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # warm up: the heap grows to its working size once
    torch.ones(16 * 2**20).sum()
before = faults()
for _ in range(40):
    torch.ones(16 * 2**20).sum()  # 64 MB written, then freed
print(json.dumps({"setting": setting, "faults": faults() - before}))
"""


def _probe(**env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in (allocator.ENV, "GLIBC_TUNABLES", *allocator.GLIBC_ENV)
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(allocator.platform.libc_ver()[0] != "glibc", reason="glibc-only setting")
def test_tuned_allocator_reuses_freed_buffers():
    tuned, default = _probe(), _probe(CIFAR100_MALLOC="default")
    assert tuned["setting"].startswith("glibc, freed memory kept")
    assert default["setting"].startswith("glibc default")
    # Default glibc maps and unmaps every 64 MB block: 40 x 16,384 pages faulted in. Tuned,
    # the heap may still grow a few times as it settles (seen: up to 3 blocks), never more.
    assert default["faults"] > 40 * 16_000
    assert tuned["faults"] < default["faults"] / 5


def test_user_environment_wins():
    result = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert "as set in the environment" in result["setting"]


def test_cli_records_the_setting(tiny_run):
    hardware = json.loads((tiny_run / "run.json").read_text())["hardware"]
    assert hardware["allocator"]  # says which setting the run was timed with
    assert "load_average" in hardware


def test_loading_a_trained_model_tunes_the_allocator(tiny_run):
    """API and benchmark callers of load_trained (no CLI start-up) get the setting too."""
    probe = (
        "import sys\nfrom cifar100.runtime import allocator\n"
        "from cifar100.runs.trained import load_trained\n"
        "before = allocator._applied\n"
        "load_trained(sys.argv[1])\n"
        "print(before, '|', allocator._applied)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, *allocator.GLIBC_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tiny_run)],
        env=clean,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    before, after = out.stdout.strip().split(" | ")
    assert before == "None" and after != "None"
