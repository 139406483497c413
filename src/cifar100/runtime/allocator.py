"""Keep freed tensor memory inside the process instead of handing it back to the kernel.

glibc's malloc serves every block above its mmap threshold (a few MB once it adapts) with a
fresh ``mmap`` and unmaps it on ``free``. A MobileNetV2 forward pass at 160 px allocates and
frees tens of such activation buffers per batch, so each batch faults every page in again:
on a 2-core virtual machine that cost 2-3x the throughput, most of it as system time
(issue 17: 52 vs 155 img/s for inference, 26 M vs 0.3 M page faults). Raising the mmap and
trim thresholds makes freed blocks stay in the heap, ready for the next batch, which is what
the caching allocators (jemalloc, tcmalloc) that PyTorch's CPU guide recommends also do.

Set ``CIFAR100_MALLOC=default`` to keep glibc's behaviour (for measurements, or to return
memory to the system between phases).
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "CIFAR100_MALLOC"
# glibc's mallopt takes an int: 2 GiB - 1 is the largest threshold it accepts, far above any
# single activation buffer here, so no tensor is served by mmap and none is trimmed away.
THRESHOLD = 2**31 - 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(THRESHOLD)}

_applied: str | None = None


def tune_allocator() -> str:
    """Apply the setting once per process (idempotent); return a one-line description of it.

    The environment variables are exported too, so that processes started from this one
    (``torchrun`` workers of a launcher script, subprocess benchmarks) start tuned.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> str:
    if os.environ.get(ENV, "tuned").lower() == "default":
        return f"glibc default ({ENV}=default)"
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return f"preloaded allocator ({os.path.basename(preload.split(':')[0])})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system default (not glibc)"
    if any(name in os.environ for name in GLIBC_ENV) or "GLIBC_TUNABLES" in os.environ:
        return "glibc, as set in the environment (MALLOC_*_ / GLIBC_TUNABLES)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        accepted = (
            libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
        )
    except (OSError, AttributeError):
        accepted = False
    if not accepted:
        return "glibc default (mallopt refused)"
    os.environ.update(GLIBC_ENV)
    return "glibc, freed memory kept (mmap and trim thresholds 2 GiB)"
