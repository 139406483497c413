"""How fast a run goes on its device: CPU runs are left exactly alone unless asked.

On CUDA: cuDNN autotuning and TF32 for the few float32 matmuls outside bf16 autocast (set
by ``speed_up``), an optional ``torch.compile`` that falls back to eager on any compiler
failure, and the step cadence at which the host reads results back (``sync_interval``).
``autocast_dtype`` turns ``train.precision`` into the autocast a step runs under: bf16 on
CUDA by default, and on a CPU only when asked (``--precision bf16``), since only CPUs with
AMX or AVX512-BF16 run it natively (there it trains cnn-fast ~3x faster than fp32).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from cifar100.config.limits import COMPILE_MODES
from cifar100.config.schema import ConfigError

# Steps between host read-backs (and cross-rank agreements) on a GPU. A step of these
# networks takes tens of milliseconds there, so a stop request waits a second or two at
# most, while the pipeline drains once per 20 steps instead of at every step.
GPU_SYNC_EVERY = 20


def sync_interval(setting: int | None, device: torch.device) -> int:
    """``train.sync_every``, or its default: every step on CPU, where reading a number back
    costs nothing (and Ctrl-C stops at the very next step), every 20 on an accelerator."""
    if setting is not None:
        if setting < 1:
            raise ConfigError(f"train.sync_every={setting}: must be 1 or more steps")
        return setting
    return 1 if device.type == "cpu" else GPU_SYNC_EVERY


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a training step autocasts to under ``train.precision`` (None: fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def precision_name(autocast: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: how caches and reports name the autocast dtype."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast]


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: without them oneDNN emulates bf16, slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def warn_emulated_bf16(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print(
            "train.precision=bf16: this CPU has no native bf16 (AMX or AVX512-BF16), so "
            "training will be slower than in fp32",
            file=sys.stderr,
        )


def speed_up(device: torch.device) -> None:
    """Fast defaults on CUDA: the input shapes never change, so cuDNN may time its kernels
    once and keep the fastest; float32 matmuls may use TF32."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """``torch.compile(model, mode=mode)``, guarded: compiling happens at the first step, and
    a failure there (no C++ compiler or Triton, an unsupported op) runs that code eagerly
    instead of ending the run. The caller keeps the plain module for checkpoints and
    evaluation. ``mode`` is ``train.compile_mode`` (``COMPILE_MODES``); ``reduce-overhead``
    records CUDA graphs (on a CPU torch skips them and compiles as in ``default``)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode={mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # compiler errors: eager, with a warning
        return torch.compile(model, mode=mode)
    except Exception as error:  # torch built without dynamo, an old Python
        print(
            f"torch.compile unavailable ({type(error).__name__}: {error}); training eagerly",
            file=sys.stderr,
        )
        return model


# Scoring whole networks on images: compiling pays back past about this many input pixels
# (Lite2 at 224 px in fp32 on 2 cores is ~2.5x as fast frozen-compiled as eager).
COMPILE_MIN_PIXELS = 10_000 * 160 * 160


def inference_runner(
    model: nn.Module, device: torch.device, images: int, size: int, batch: int
) -> nn.Module:
    """The network that scores ``images`` images of ``size`` px in batches of ``batch``: on
    a CPU, when there are enough of them to repay compiling, ``model`` compiled with
    Inductor's freezing and fed batches of one shape; otherwise ``model`` itself."""
    if device.type != "cpu" or images * size * size < COMPILE_MIN_PIXELS:
        return model
    return StaticBatch(CompiledOrEager(model.eval()), batch)


class StaticBatch(nn.Module):
    """``module`` fed batches of exactly ``size`` rows, a short last batch padded with copies
    of its first row and the padding's outputs dropped: one compiled graph serves them all."""

    def __init__(self, module: nn.Module, size: int):
        super().__init__()
        self.module, self.size = module, size

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = len(inputs)
        if rows < self.size:
            pad = inputs[:1].expand(self.size - rows, *inputs.shape[1:])
            inputs = torch.cat([inputs, pad])
        return self.module(inputs)[:rows]


class CompiledOrEager(nn.Module):
    """``torch.compile`` that really falls back: compilation happens on the first call, so
    that is where a missing compiler toolchain shows, and where we switch to eager.

    The backbone is frozen while it extracts, so it compiles with Inductor's ``freezing``:
    weights become constants, BatchNorm folds into the convolutions and oneDNN packs the
    weights once (Lite2 at 224 px under bf16 on a 2-core Xeon with AMX: 324 images/s against
    167 compiled without it, ``results/benchmarks/feature_speed.txt``).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.eager = module
        self.compiled = None
        try:
            self.compiled = torch.compile(module, dynamic=False)
        except Exception as error:  # noqa: BLE001  (any failure: eager is only slower)
            _warn_eager(error)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                from torch._inductor import config as inductor_config

                # compilation happens in the call, and reads the setting there (as a
                # torch.compile option it is not honoured: measured no faster than without)
                with inductor_config.patch(freezing=True):
                    return self.compiled(images)
            except Exception as error:  # noqa: BLE001
                _warn_eager(error)
                self.compiled = None
        return self.eager(images)


def _warn_eager(error: Exception) -> None:
    print(
        f"warning: torch.compile failed ({type(error).__name__}); running the network "
        "without it (slower, same results)",
        file=sys.stderr,
        flush=True,
    )
