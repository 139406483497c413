"""Inference on a split: the logits of a model, averaged over test-time augmentation views,
and the loss, top-1 and top-5 they score. Training validates with ``score``; the report,
calibration and ensembles start from ``predict_logits``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from cifar100.data.batches import Batches, capped_batch
from cifar100.runtime import stopping
from cifar100.runtime.speed import autocast_dtype

PRECISIONS = ("run", "fp32", "bf16")


@dataclass(frozen=True)
class InferenceSettings:
    """How a run's logits are computed: where, how many images at a time, which
    test-time augmentation views are averaged (the mirror; shifts by ``tta_translate`` px)
    and at what precision: ``run`` measures each run at the precision it trained at
    (``train.precision``), because a head trained on bf16 backbone features scores lower
    on fp32 ones; ``fp32`` or ``bf16`` force one for every run."""

    device: torch.device
    batch_size: int = 500
    tta_flip: bool = False
    tta_translate: int = 0
    precision: str = "run"

    def autocast(self, trained_precision: str) -> torch.dtype | None:
        """The dtype a run trained at ``trained_precision`` is measured under (None: fp32)."""
        chosen = trained_precision if self.precision == "run" else self.precision
        return autocast_dtype(chosen, self.device)

    @property
    def plain(self) -> InferenceSettings:
        """The same without test-time augmentation (what calibration files are fitted on)."""
        return replace(self, tta_flip=False, tta_translate=0)

    @property
    def augmented(self) -> bool:
        return self.tta_flip or bool(self.tta_translate)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2,) int64 on the logits' device: the labels found at top-1, and within the top-5."""
    top5 = logits.topk(5, dim=1).indices  # (B, 5)
    hits = top5 == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top1, top5 = topk_hits(logits, labels).tolist()
    return top1, top5


def tta_views(flip: bool, translate: int) -> list[tuple[bool, int]]:
    """(mirrored, shift) of every view test-time augmentation averages; (False, 0) first."""
    shifts = [0, -translate, translate] if translate else [0]
    return [(mirror, shift) for shift in shifts for mirror in ([False, True] if flip else [False])]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    batches: Batches,
    batch_size: int,
    tta_flip: bool = False,
    autocast: torch.dtype | None = None,
    tta_translate: int = 0,
) -> torch.Tensor:
    """(N, classes) float32 logits on CPU, in the split's order (copied back once, at the end).

    Test-time augmentation averages the logits of several views of each image: its mirror
    (``tta_flip``) and, with ``tta_translate`` N, the image moved N pixels up-left and
    down-right (each mirrored too under ``tta_flip``): airbench's multi-crop TTA.
    """
    views = tta_views(tta_flip, tta_translate)
    model.eval()
    outputs = []
    where = batches.labels.device  # index where the data lives
    preprocess = getattr(batches, "preprocess", None)  # feature batches have no image size
    if preprocess is not None:
        batch_size = capped_batch(batch_size, preprocess.size)
    for start in range(0, len(batches), batch_size):
        stopping.check()  # a stop asked for during a training stage's validation
        indices = torch.arange(start, min(start + batch_size, len(batches)), device=where)
        with torch.autocast(
            batches.device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ):
            logits = sum(
                model(batches.get(indices, flip=flip, shift=shift)).float() for flip, shift in views
            )
        outputs.append(logits / len(views))
    return torch.cat(outputs).cpu()


def score(
    model: nn.Module,
    batches: Batches,
    batch_size: int,
    tta_flip: bool = False,
    autocast: torch.dtype | None = None,
    tta_translate: int = 0,
) -> dict[str, float]:
    """Loss, top-1 and top-5 of ``model`` on ``batches`` (validation in the loop, test after)."""
    logits = predict_logits(model, batches, batch_size, tta_flip, autocast, tta_translate)
    labels = batches.labels.cpu()
    top1, top5 = topk_correct(logits, labels)
    loss = F.cross_entropy(logits, labels).item()
    return {"loss": loss, "top1": top1 / len(labels), "top5": top5 / len(labels)}
