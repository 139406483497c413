"""Transfer learning from an ImageNet backbone (MobileNetV2, EfficientNet-Lite0): stage 1
trains a new head on the frozen backbone, stage 2 fine-tunes the whole network (or its top
blocks) at a low learning rate. Both backbones share ``features`` / ``classifier`` and the
freezing helpers of ``cifar100.models.backbone``; their weight sources are in
``cifar100.weights.SOURCES``.

While the backbone is frozen its output for an image never changes, so stage 1 computes
the pooled features once (per input size, for the image and its mirror) and trains the
head on them: an epoch then costs a matrix multiply instead of 40,000 backbone passes.
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

from cifar100 import distributed
from cifar100.data import default_cache_dir
from cifar100.download import file_digest
from cifar100.engine import ImageBatches, StepContext
from cifar100.models import build_model
from cifar100.models.backbone import freeze_backbone, trainable_parameters, unfreeze
from cifar100.optim import make_optimizer, make_scheduler
from cifar100.runs import read_json, write_json
from cifar100.training import Run, Stage, run_stage
from cifar100.weights import load_pretrained, resolve_weights, weight_source

FEATURE_BATCH = 250


@dataclass
class FeatureBatches:
    """Cached backbone features served like ``ImageBatches``; "augmentation" picks a view."""

    plain: torch.Tensor  # (N, 1280) features of the images
    mirrored: torch.Tensor  # (N, 1280) features of their horizontal mirrors
    labels: torch.Tensor  # (N,)
    device: torch.device

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: torch.Tensor, generator: torch.Generator | None = None,
            flip: bool = False) -> torch.Tensor:
        if generator is None:
            return (self.mirrored if flip else self.plain)[indices].float().to(self.device)
        pick = torch.rand(len(indices), generator=generator, device=generator.device) < 0.5
        views = torch.where(pick.cpu()[:, None], self.mirrored[indices], self.plain[indices])
        return views.float().to(self.device)


def _extract(backbone, batches: ImageBatches, flip: bool, desc: str) -> torch.Tensor:
    outputs = []
    with torch.no_grad(), tqdm(total=len(batches), desc=desc, unit="img", file=sys.stderr,
                               leave=False, disable=None) as bar:
        for start in range(0, len(batches), FEATURE_BATCH):
            indices = torch.arange(start, min(start + FEATURE_BATCH, len(batches)))
            images = batches.get(indices, flip=flip)
            if len(indices) < FEATURE_BATCH:  # keep one static shape for the compiled graph
                pad = images[:1].expand(FEATURE_BATCH - len(indices), -1, -1, -1)
                images = torch.cat([images, pad]).contiguous(memory_format=torch.channels_last)
            features = backbone(images)[: len(indices)]  # (B, 1280, h, w)
            outputs.append(features.mean(dim=(2, 3)).half().cpu())  # fp16 halves the cache
            bar.update(len(indices))
    return torch.cat(outputs)


def _backbone(model: nn.Module, compile_it: bool) -> nn.Module:
    features = model.features.eval()
    if not compile_it:
        return features
    try:
        return torch.compile(features, dynamic=False)
    except Exception as error:  # no compiler toolchain: eager is only slower
        print(f"torch.compile unavailable ({type(error).__name__}); using eager", file=sys.stderr)
        return features


def cached_features(run: Run, model: nn.Module, weights_sha256: str) -> dict[str, torch.Tensor]:
    """Features of all 50,000 training images (plain and mirrored), from cache or computed.

    Under torchrun rank 0 computes and writes the file while the other ranks wait for it.
    """
    size = run.preprocess.size
    images = run.dataset.train.images.numpy()
    data_id = hashlib.sha1(images).hexdigest()[:8]  # ~0.2 s: never reuse another set's features
    key = (f"mobilenetv2-w{run.config.model.width_mult}-{weights_sha256[:12]}-{data_id}"
           f"-{size}px")
    path = default_cache_dir() / "features" / f"{key}.pt"
    if distributed.is_main() and not path.is_file():
        batches = ImageBatches(run.dataset.train, run.preprocess, run.device)
        backbone = _backbone(model, run.config.transfer.compile and run.device.type == "cpu")
        cached = {"plain": _extract(backbone, batches, False, f"features {size}px"),
                  "mirrored": _extract(backbone, batches, True, f"mirrored features {size}px")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(cached, tmp)
        tmp.replace(path)  # atomic: a killed extraction never leaves a half file behind
    distributed.barrier()
    return torch.load(path, map_location="cpu", weights_only=True)


def frozen_stage(run: Run, model: nn.Module, weights_sha256: str) -> Stage:
    cfg = run.config.transfer
    freeze_backbone(model)
    labels = run.dataset.train.labels
    if cfg.cache_features:
        started = time.perf_counter()
        features = cached_features(run, model, weights_sha256)
        run.elapsed += time.perf_counter() - started
        train_idx, val_idx = run.splits.train_index, run.splits.val_index
        train = FeatureBatches(features["plain"][train_idx], features["mirrored"][train_idx],
                               labels[train_idx], run.device)
        val = FeatureBatches(features["plain"][val_idx], features["mirrored"][val_idx],
                             labels[val_idx], run.device)
        trained, augment = model.classifier, None
    else:
        train = ImageBatches(run.splits.train, run.preprocess, run.device, run.config.augment)
        val = ImageBatches(run.splits.val, run.preprocess, run.device)
        trained, augment = model, run.config.augment
    return _stage(run, "frozen", trained, model, cfg.stage1_epochs, cfg.stage1_batch_size,
                  cfg.stage1_lr, 0.0, train, val, augment)


def finetune_stage(run: Run, model: nn.Module, best_top1: float) -> Stage:
    # Unfrozen blocks' BatchNorm layers train normally: upsampled 32 px images have other
    # statistics than ImageNet photos, and batches of 64+ estimate them well.
    cfg = run.config.transfer
    unfreeze(model, cfg.stage2_unfreeze)
    train = ImageBatches(run.splits.train, run.preprocess, run.device, run.config.augment)
    val = ImageBatches(run.splits.val, run.preprocess, run.device)
    stage = _stage(run, "finetune", model, model, cfg.stage2_epochs, run.config.train.batch_size,
                   cfg.stage2_lr, cfg.stage2_warmup_epochs, train, val, run.config.augment)
    stage.best_top1 = best_top1  # best.pt is replaced only by a better fine-tuned model
    return stage


def _stage(run, name, trained, full, epochs, batch_size, lr, warmup, train, val, augment):
    config = run.config
    params = trainable_parameters(trained)
    optimizer = make_optimizer(params, config.optim, lr=lr)
    scheduler, per_step = make_scheduler(optimizer, config.optim, epochs,
                                         max(len(train) // batch_size, 1), warmup)
    autocast = torch.bfloat16 if run.device.type == "cuda" else None
    ctx = StepContext(optimizer, scheduler if per_step else None, len(run.dataset.class_names),
                      config.optim.label_smoothing, augment, config.optim.grad_clip, None,
                      autocast)
    return Stage(name, trained, epochs, batch_size, train, val, ctx,
                 plateau=None if per_step else scheduler, full_model=full)


def record_weights(run_dir: Path, weights: Path, sha256: str) -> None:
    """Add the pretrained file's name and sha256 to run.json: the config may say only None."""
    if not distributed.is_main():
        return
    info = read_json(run_dir / "run.json")
    info["pretrained_weights"] = {"file": str(weights), "sha256": sha256}
    write_json(run_dir / "run.json", info)


def run_transfer(run: Run) -> nn.Module:
    """Stage 1 then (if configured) stage 2; returns the network for the test evaluation."""
    torch.manual_seed(run.config.train.seed)
    model = build_model(run.config.model).to(run.device, memory_format=torch.channels_last)
    weights = resolve_weights(run.config.model.weights,
                              source=weight_source(run.config.model.name))
    load_pretrained(model, weights)
    weights_sha256 = file_digest(weights)  # names the feature cache and goes into run.json
    record_weights(run.run_dir, weights, weights_sha256)
    resumed_stage = run.resume["stage"] if run.resume else None
    best_top1 = run.resume["best_top1"] if run.resume else -1.0
    if resumed_stage != "finetune":
        stage = frozen_stage(run, model, weights_sha256)
        run_stage(run, stage)
        best_top1 = stage.best_top1
    if run.config.transfer.stage2_epochs > 0:
        if resumed_stage != "finetune":  # fine-tune from the best head, not the last
            from cifar100.checkpoint import load_checkpoint

            model.load_state_dict(load_checkpoint(
                run.run_dir / "checkpoints" / "best.pt")["model"])
        run_stage(run, finetune_stage(run, model, best_top1))
    return model
