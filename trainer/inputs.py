"""Builds what the loop consumes from the config: two-view train/valid loaders and the labeled split for monitoring."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.augment import SimCLRAugment
from data.digits import load_digits_uint8, synthetic_images
from data.memory_loader import MemoryTwoViewLoader
from data.splits import split_indices, stratified_split
from data.views import Shard, ViewCrop
from trainer.config import Config
from trainer.distributed import DistContext


@dataclass
class LabeledSplit:
    """Unaugmented labeled images for the kNN monitor and the final probe (train part and held-out test part)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class PretrainData:
    train: object  # a two-view loader: steps_per_epoch, batches(epoch, start_step)
    valid: object | None
    augment: SimCLRAugment
    labeled: LabeledSplit | None


def build_augment(cfg: Config) -> SimCLRAugment:
    d = cfg.dataset
    return SimCLRAugment(strength=d.s, jitter_prob=d.jitter_prob, grayscale_prob=d.grayscale_prob,
                         blur_prob=d.blur_prob, solarize_prob=d.solarize_prob)


def _in_memory(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.dataset.image_size
    if cfg.dataset.name == "digits":
        return load_digits_uint8(size)
    return synthetic_images(cfg.dataset.synthetic_size, size, seed=cfg.seed)


def _two_view_loader(cfg: Config, ctx: DistContext, shard: Shard, batch_size: int, images=None, source=None):
    d = cfg.dataset
    crop = ViewCrop(d.image_size, scale=(d.crop_min_scale, 1.0), flip_prob=d.flip_prob)
    if d.loader == "memory":
        return MemoryTwoViewLoader(images, batch_size, crop, shard, device=ctx.device)
    if d.loader == "torchvision":
        from data.torchvision_loader import TorchvisionTwoViewLoader
        return TorchvisionTwoViewLoader(source, batch_size, crop, shard, num_workers=d.num_workers, device=ctx.device)
    from data.ffcv_loader import FFCVTwoViewLoader
    return FFCVTwoViewLoader(d.path, batch_size, crop, shard, num_workers=max(1, d.num_workers), device=ctx.device)


def build_pretrain_data(cfg: Config, ctx: DistContext) -> PretrainData:
    """Loaders over the training pool (minus the held-out valid_size split) and, for digits/synthetic, the
    labeled split whose test part pretraining never sees."""
    d = cfg.dataset
    per_rank_batch = cfg.batch_size // ctx.world_size
    images = source = labeled = pool = None
    if d.name in ("digits", "synthetic"):
        images, labels = _in_memory(cfg)
        pool, test = stratified_split(labels, cfg.eval.test_fraction, seed=cfg.seed)
        labeled = LabeledSplit(images[pool], labels[pool], images[test], labels[test])
        count = len(images)
    if d.loader == "torchvision":
        from data.sources import open_source
        source = open_source(d.name, d.path or None, d.split)
        count = len(source)
    elif d.loader == "ffcv":
        from data.ffcv_loader import beton_size
        count = beton_size(d.path)
    pool = torch.arange(count) if pool is None else pool
    train_rel, valid_rel = split_indices(len(pool), d.valid_size, seed=cfg.seed)
    train_idx, valid_idx = pool[train_rel], pool[valid_rel]
    train = _two_view_loader(cfg, ctx, Shard(ctx.rank, ctx.world_size, cfg.seed, train_idx), per_rank_batch,
                             images, source)
    valid = None
    valid_batch = min(per_rank_batch, len(valid_idx) // ctx.world_size)
    if valid_batch >= 2:  # the validation loss needs at least one pair of negatives per rank
        valid = _two_view_loader(cfg, ctx, Shard(ctx.rank, ctx.world_size, cfg.seed + 1, valid_idx), valid_batch,
                                 images, source)
    return PretrainData(train, valid, build_augment(cfg), labeled)
