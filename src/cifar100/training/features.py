"""Frozen-backbone features: computed once per image, cached on disk, reused by every run.

While a pretrained backbone is frozen its output for an image never changes, so stage 1
trains its head on pooled features instead of images: an epoch costs a matrix multiply
instead of 40,000 backbone passes. When stage 1 also trains the top blocks
(``transfer.stage1_unfreeze``), the frozen part is the blocks below them, and the cache
holds their output maps instead (Lite2 at 224 px: 208 x 7 x 7 per image, 20 kB in float16).
The cache holds one row per training image and view (plain, mirrored) with a mask of the
rows computed so far, so that

- a run extracts only the images it uses (a ``--train-subset`` smoke run: its subset and
  the validation images), and a later, larger run computes only what is missing;
- an interrupted extraction (Ctrl-C, SIGTERM, a crash after a periodic save) keeps what it
  computed, and a row is trusted only where the mask says it is complete.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cifar100.config.schema import Config
from cifar100.data.batches import ImageBatches, capped_batch
from cifar100.data.cifar import default_cache_dir
from cifar100.errors import UserError
from cifar100.runtime.checkpoint import save_checkpoint
from cifar100.runtime.speed import CompiledOrEager, precision_name
from cifar100.runtime.stopping import interrupted

FEATURE_BATCH = 250
VIEWS = ("plain", "mirrored")
SAVE_EVERY_S = 300.0  # periodic saves bound what a hard kill (SIGKILL, power) can lose
COMPILE_MIN_IMAGES = 20_000  # torch.compile costs ~30-60 s on 2 cores: worth it past this
LOG_EVERY = 5_000  # at most this many images between progress lines (no terminal)


class IncompleteCacheError(UserError):
    """A cache another process should have filled lacks rows this run needs."""


@dataclass
class FeatureBatches:
    """Cached backbone features served like ``ImageBatches``; "augmentation" picks a view."""

    plain: torch.Tensor  # (N, C) pooled features of the images, or (N, C, h, w) maps
    mirrored: torch.Tensor | None  # the same of their horizontal mirrors, or None
    labels: torch.Tensor  # (N,)
    device: torch.device

    def __len__(self) -> int:
        return len(self.labels)

    def get(
        self,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        flip: bool = False,
        shift: int = 0,
    ) -> torch.Tensor:
        if shift:  # stored features are of the unmoved image (and its mirror) only
            raise ValueError("cached features have no shifted views (train.tta_translate)")
        if generator is None or self.mirrored is None:
            views = self.mirrored if flip else self.plain
            return _as_input(views[indices], self.device)
        pick = torch.rand(len(indices), generator=generator, device=generator.device) < 0.5
        pick = pick.cpu().view(-1, *(1,) * (self.plain.dim() - 1))  # broadcast over a row
        views = torch.where(pick, self.mirrored[indices], self.plain[indices])
        return _as_input(views, self.device)


def _as_input(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    rows = rows.float().to(device)
    return rows.contiguous(memory_format=torch.channels_last) if rows.dim() == 4 else rows


@dataclass
class FeatureCache:
    """Rows of features for the full training set, with a mask of computed rows."""

    path: Path
    features: dict[str, torch.Tensor]  # view -> (N, C) or (N, C, h, w) float16 (half the file)
    done: dict[str, torch.Tensor]  # view -> (N,) bool

    def missing(self, view: str, indices: torch.Tensor) -> torch.Tensor:
        return indices[~self.done[view][indices]]

    def save(self) -> None:
        save_checkpoint({"features": self.features, "done": self.done}, self.path)


def cache_path(
    config: Config,
    size: int,
    weights_sha256: str,
    images: torch.Tensor,
    autocast: torch.dtype | None = None,
    blocks: int | None = None,
) -> Path:
    """One file per backbone, weights, data, input size, normalisation, precision and depth:
    never another's (bf16 features differ from fp32 ones in the last bits, so they never
    mix). ``blocks``: the unpooled maps of the first ``blocks`` feature blocks; None: the
    whole backbone's pooled features."""
    data_id = hashlib.sha1(images.numpy()).hexdigest()[:8]  # ~0.2 s for 50,000 images
    norm = "std" if config.data.standardize else "raw"
    precision = "" if autocast is None else f"-{precision_name(autocast)}"
    depth = "" if blocks is None else f"-maps{blocks}"
    key = (
        f"{config.model.name}-w{config.model.width_mult}-{weights_sha256[:12]}-{data_id}"
        f"-{size}px-{norm}{precision}{depth}"
    )
    return default_cache_dir() / "features" / f"{key}.pt"


def open_cache(path: Path, rows: int, shape: tuple[int, ...]) -> FeatureCache:
    """The cache at ``path`` for ``rows`` images of ``shape`` features each, or an empty
    one; an unreadable file is set aside, not trusted."""
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if all(state["features"][v].shape == (rows, *shape) for v in VIEWS):
                return FeatureCache(path, state["features"], state["done"])
        except Exception as error:  # noqa: BLE001  (a cache: any damage means recompute)
            print(
                f"warning: {path}: unreadable feature cache ({type(error).__name__}); "
                "computing the features again",
                file=sys.stderr,
            )
    return FeatureCache(
        path,
        {v: torch.zeros(rows, *shape, dtype=torch.float16) for v in VIEWS},
        {v: torch.zeros(rows, dtype=torch.bool) for v in VIEWS},
    )


def require_rows(cache: FeatureCache, wanted: dict[str, torch.Tensor]) -> None:
    """Refuse a cache that lacks rows of ``wanted``: an empty row would be read as zeros.

    Under torchrun the processes that did not fill the cache read it; where their cache
    folder is not the one their machine's first process filled, they stop here.
    """
    missing = {view: len(cache.missing(view, index)) for view, index in wanted.items()}
    if any(missing.values()):
        counts = ", ".join(f"{n:,} {view}" for view, n in missing.items() if n)
        raise IncompleteCacheError(
            f"{cache.path}: the feature cache lacks rows this run needs ({counts}); the "
            "first process of this machine filled another cache folder: give every "
            "process of a machine the same CIFAR100_CACHE"
        )


def fill_cache(
    cache: FeatureCache,
    backbone_of,
    batches: ImageBatches,
    wanted: dict[str, torch.Tensor],
    size: int,
    autocast: torch.dtype | None = None,
    pool: bool = True,
) -> None:
    """Compute the wanted rows that are missing; save progress if interrupted.

    ``backbone_of(n)`` returns the network to run for ``n`` images (compiled or not);
    ``autocast`` is the dtype it runs under (None: fp32). bf16 on a CPU with AMX extracts
    about 1.7x as fast as fp32. ``pool``: store the spatial mean of each output map, else
    the maps.
    """
    todo = {view: cache.missing(view, index) for view, index in wanted.items()}
    total = sum(len(index) for index in todo.values())
    if total == 0:
        return
    print(
        f"extracting backbone features of {total:,} images at {size} px "
        f"({', '.join(f'{len(i):,} {v}' for v, i in todo.items() if len(i))}); "
        f"later runs reuse them from {cache.path.parent}",
        file=sys.stderr,
        flush=True,
    )
    backbone, progress = backbone_of(total), Progress(total, f"features {size}px")
    batch = capped_batch(FEATURE_BATCH, size)
    try:
        for view, index in todo.items():
            for start in range(0, len(index), batch):
                rows = index[start : start + batch]
                cache.features[view][rows] = backbone_features(
                    backbone, batches, rows, view == "mirrored", batch, autocast, pool
                )
                cache.done[view][rows] = True
                if progress.update(len(rows)):
                    cache.save()
    except KeyboardInterrupt as stop:
        cache.save()
        raise interrupted(
            stop,
            f"features of {progress.done:,} of {total:,} images were "
            "saved to the cache; the next run continues from there",
        ) from None
    finally:
        progress.close()
    cache.save()


def backbone_features(
    backbone: nn.Module,
    batches: ImageBatches,
    rows: torch.Tensor,
    flip: bool,
    batch: int = FEATURE_BATCH,
    autocast: torch.dtype | None = None,
    pool: bool = True,
) -> torch.Tensor:
    """float16 features of images ``rows``: (B, C) pooled, or (B, C, h, w) maps."""
    images = batches.get(rows, flip=flip)  # (B, 3, S, S)
    if len(rows) < batch:  # keep one static shape for the compiled graph
        pad = images[:1].expand(batch - len(rows), -1, -1, -1)
        images = torch.cat([images, pad]).contiguous(memory_format=torch.channels_last)
    with (
        torch.no_grad(),
        torch.autocast(
            images.device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ),
    ):
        features = backbone(images)[: len(rows)]  # (B, C, h, w)
    if pool:
        features = features.float().mean(dim=(2, 3))  # (B, C)
    return features.half().cpu()


class Progress:
    """A tqdm bar on a terminal; otherwise a line every few thousand images, with the ETA."""

    def __init__(self, total: int, desc: str):
        self.total, self.done, self.desc = total, 0, desc
        self.started = self.last_save = time.monotonic()
        self.bar = tqdm(
            total=total, desc=desc, unit="img", file=sys.stderr, leave=False, disable=None
        )
        self.logged = 0
        self.log_every = max(FEATURE_BATCH, min(LOG_EVERY, total // 10))

    def update(self, n: int) -> bool:
        """Count ``n`` more images; True when a periodic save is due."""
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        due = self.done - self.logged >= self.log_every and self.done < self.total
        if self.bar.disable and due:
            rate = self.done / max(now - self.started, 1e-9)
            print(
                f"{self.desc}: {self.done:,}/{self.total:,} images, {rate:.0f} img/s, "
                f"{(self.total - self.done) / rate / 60:.1f} min left",
                file=sys.stderr,
                flush=True,
            )
            self.logged = self.done
        if now - self.last_save > SAVE_EVERY_S:
            self.last_save = now
            return True
        return False

    def close(self) -> None:
        self.bar.close()


def backbone_runner(features: nn.Module, compile_allowed: bool):
    """``n -> module``: the eval-mode backbone, compiled when ``n`` images repay compiling."""

    def runner(n: int) -> nn.Module:
        features.eval()
        if not compile_allowed or n < COMPILE_MIN_IMAGES:
            return features
        return CompiledOrEager(features)

    return runner
