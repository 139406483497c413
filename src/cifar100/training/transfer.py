"""Transfer learning from an ImageNet backbone (MobileNetV2, EfficientNet-Lite0): stage 1
trains a new head on the frozen backbone, stage 2 fine-tunes the whole network (or its top
blocks) at a low learning rate: the plan ``transfer_stages`` that their registry entries
name (``cifar100.training.plans``). Both backbones share ``features`` / ``classifier`` and the
freezing helpers of ``cifar100.models.backbone``; their weight sources are in
``cifar100.models.weights.SOURCES``.

While the backbone is frozen its output for an image never changes, so stage 1 computes
the pooled features once (per input size, for the image and its mirror) and trains the
head on them: an epoch then costs a matrix multiply instead of 40,000 backbone passes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from cifar100.data.batches import ImageBatches
from cifar100.models import build_model
from cifar100.models.backbone import set_frozen_blocks, trainable_parameters, unfreeze
from cifar100.models.weights import load_pretrained, resolve_weights, weight_source
from cifar100.runs.folders import read_json, write_json
from cifar100.runtime import distributed
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.runtime.download import file_digest
from cifar100.training.engine import StepContext
from cifar100.training.features import (
    FeatureBatches,
    FeatureCache,
    backbone_runner,
    cache_path,
    fill_cache,
    open_cache,
    require_rows,
)
from cifar100.training.loop import Run, Stage
from cifar100.training.optim import make_optimizer, make_scheduler


def cached_features(
    run: Run, model: nn.Module, weights_sha256: str, frozen_blocks: int
) -> FeatureCache:
    """Features of the images this run uses, from the cache or computed: the pooled output
    of the whole backbone, or the maps of its first ``frozen_blocks`` blocks when the top
    ones train.

    Training images need both views (the mirror is stage 1's flip augmentation) unless
    flipping is off; validation images only the plain one. Under torchrun the first process
    of each machine computes what its cache lacks (rank 0 first: a cache on shared storage
    is then complete for the others) while the other processes wait, then read the file.
    """
    dataset, size = run.dataset.train, run.preprocess.size
    pool = frozen_blocks == len(model.features)
    frozen = model.features[:frozen_blocks]
    path = cache_path(
        run.config,
        size,
        weights_sha256,
        dataset.images,
        run.autocast,
        blocks=None if pool else frozen_blocks,
    )
    wanted = {"plain": torch.cat([run.splits.train_index, run.splits.val_index]).unique()}
    if run.config.augment.flip:
        wanted["mirrored"] = run.splits.train_index
    shape = output_shape(frozen, size, run.device)
    shape = shape[:1] if pool else shape

    def extract(may_compute: bool) -> FeatureCache:
        cache = open_cache(path, len(dataset), shape)
        if not may_compute:  # another process of this machine has just filled it
            require_rows(cache, wanted)
            return cache
        compile_allowed = run.config.transfer.compile and run.device.type == "cpu"
        fill_cache(
            cache,
            backbone_runner(frozen, compile_allowed),
            ImageBatches(dataset, run.preprocess, run.device),
            wanted,
            size,
            run.autocast,
            pool,
        )
        return cache

    return distributed.main_first(extract)


def output_shape(blocks: nn.Module, size: int, device: torch.device) -> tuple[int, ...]:
    """(C, h, w) of the blocks' output, probed in eval mode (BN statistics untouched)."""
    was_training = blocks.training
    blocks.eval()
    with torch.no_grad():
        shape = blocks(torch.zeros(1, 3, size, size, device=device)).shape[1:]
    blocks.train(was_training)
    return tuple(shape)


class TopOfBackbone(nn.Module):
    """The network above its first ``start`` feature blocks: maps from the cache -> logits.

    It shares the backbone's modules, so what it learns is the full model's, which the
    checkpoints save and the test pass runs on images."""

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self.model.forward_features(maps, self.start))


def validation_batches(run: Run) -> ImageBatches | None:
    """The validation images; None in a refit (``train.refit``), which validates nothing."""
    if run.config.train.refit:
        return None
    return ImageBatches(run.splits.val, run.preprocess, run.device)


def frozen_stage(run: Run, model: nn.Module, weights_sha256: str) -> Stage:
    cfg = run.config.transfer
    frozen_blocks = len(model.features) - cfg.stage1_unfreeze
    set_frozen_blocks(model, frozen_blocks)
    labels = run.dataset.train.labels
    if cfg.cache_features:
        started = time.perf_counter()
        cache = cached_features(run, model, weights_sha256, frozen_blocks)
        run.elapsed += time.perf_counter() - started
        train_idx, val_idx = run.splits.train_index, run.splits.val_index
        mirrored = cache.features["mirrored"][train_idx] if run.config.augment.flip else None
        train = FeatureBatches(
            cache.features["plain"][train_idx], mirrored, labels[train_idx], run.device
        )
        val = (
            None  # a refit validates nothing
            if run.config.train.refit
            else FeatureBatches(cache.features["plain"][val_idx], None, labels[val_idx], run.device)
        )
        trained = TopOfBackbone(model, frozen_blocks) if cfg.stage1_unfreeze else model.classifier
        augment = None
    else:
        train = ImageBatches(run.splits.train, run.preprocess, run.device, run.config.augment)
        val = validation_batches(run)
        trained, augment = model, run.config.augment
    return _stage(
        run,
        "frozen",
        trained,
        model,
        cfg.stage1_epochs,
        cfg.stage1_batch_size,
        cfg.stage1_lr,
        0.0,
        train,
        val,
        augment,
    )


def finetune_stage(run: Run, model: nn.Module, best_top1: float) -> Stage:
    # Unfrozen blocks' BatchNorm layers train normally: upsampled 32 px images have other
    # statistics than ImageNet photos, and batches of 64+ estimate them well.
    cfg = run.config.transfer
    unfreeze(model, cfg.stage2_unfreeze)
    train = ImageBatches(run.splits.train, run.preprocess, run.device, run.config.augment)
    val = validation_batches(run)
    stage = _stage(
        run,
        "finetune",
        model,
        model,
        cfg.stage2_epochs,
        run.config.train.batch_size,
        cfg.stage2_lr,
        cfg.stage2_warmup_epochs,
        train,
        val,
        run.config.augment,
    )
    stage.best_top1 = best_top1  # best.pt is replaced only by a better fine-tuned model
    return stage


def _stage(run, name, trained, full, epochs, batch_size, lr, warmup, train, val, augment):
    config = run.config
    params = trainable_parameters(trained)
    optimizer = make_optimizer(params, config.optim, lr=lr)
    scheduler, per_step = make_scheduler(
        optimizer, config.optim, epochs, max(len(train) // batch_size, 1), warmup
    )
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=scheduler if per_step else None,
        num_classes=len(run.dataset.class_names),
        label_smoothing=config.optim.label_smoothing,
        augment=augment,
        grad_clip=config.optim.grad_clip,
        ema=None,
        autocast=run.autocast,
    )
    return Stage(
        name,
        trained,
        epochs,
        batch_size,
        train,
        val,
        ctx,
        plateau=None if per_step else scheduler,
        full_model=full,
    )


def record_weights(run_dir: Path, weights: Path, sha256: str) -> None:
    """Add the pretrained file's name and sha256 to run.json: the config may say only None."""
    if not distributed.is_main():
        return
    info = read_json(run_dir / "run.json")
    info["pretrained_weights"] = {"file": str(weights), "sha256": sha256}
    write_json(run_dir / "run.json", info)


def pretrained_model(run: Run) -> tuple[nn.Module, str]:
    """The network with its ImageNet weights loaded, and the sha256 of the weights file."""
    torch.manual_seed(run.config.train.seed)
    model = build_model(run.config.model).to(run.device, memory_format=torch.channels_last)
    source = weight_source(run.config.model.name)
    # One download per machine: its first process fetches, the others then find the file.
    weights = distributed.main_first(
        lambda may_download: resolve_weights(run.config.model.weights, may_download, source=source)
    )
    load_pretrained(model, weights)
    weights_sha256 = file_digest(weights)  # names the feature cache and goes into run.json
    record_weights(run.run_dir, weights, weights_sha256)
    return model, weights_sha256


def transfer_stages(run: Run) -> Iterator[Stage]:
    """Stage 1 then (if configured) stage 2, each trained by the loop before the next is
    built; a run resumed in stage 2 skips stage 1 (and its feature extraction)."""
    model, weights_sha256 = pretrained_model(run)
    resumed_stage = run.resume["stage"] if run.resume else None
    best_top1 = run.resume["best_top1"] if run.resume else -1.0
    if resumed_stage != "finetune":
        stage = frozen_stage(run, model, weights_sha256)
        yield stage
        best_top1 = stage.best_top1
    if run.config.transfer.stage2_epochs > 0:
        if resumed_stage != "finetune":  # fine-tune from the best head, not the last
            model.load_state_dict(load_checkpoint(run.run_dir / "checkpoints" / "best.pt")["model"])
        yield finetune_stage(run, model, best_top1)
