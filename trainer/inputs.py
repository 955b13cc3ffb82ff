"""Builds what the loop consumes from the config: two-view train/valid loaders and the labeled split for monitoring."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.augment import SimCLRAugment
from data.digits import load_digits_uint8, synthetic_images
from data.memory_loader import MemoryTwoViewLoader, split_indices
from trainer.config import Config
from trainer.distributed import DistContext
from trainer.evaluation.probe import stratified_split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
                         blur_prob=d.blur_prob, solarize_prob=d.solarize_prob, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float normalized with the same statistics the augmentation ends with."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _in_memory(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.dataset.image_size
    if cfg.dataset.name == "digits":
        return load_digits_uint8(size)
    return synthetic_images(cfg.dataset.synthetic_size, size, seed=cfg.seed)


def _two_view_loader(cfg: Config, ctx: DistContext, indices, batch_size: int, seed: int, images=None, source=None):
    d = cfg.dataset
    common = dict(batch_size=batch_size, image_size=d.image_size, rank=ctx.rank, world_size=ctx.world_size,
                  seed=seed, indices=indices, scale=(d.crop_min_scale, 1.0), flip_prob=d.flip_prob)
    if d.loader == "memory":
        return MemoryTwoViewLoader(images, device=ctx.device, **common)
    if d.loader == "torchvision":
        from data.torchvision_loader import TorchvisionTwoViewLoader
        return TorchvisionTwoViewLoader(source, num_workers=d.num_workers, device=ctx.device, **common)
    from data.ffcv_loader import FFCVTwoViewLoader
    return FFCVTwoViewLoader(d.path, num_workers=max(1, d.num_workers), device=ctx.device, **common)


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
    train = _two_view_loader(cfg, ctx, train_idx, per_rank_batch, cfg.seed, images, source)
    valid = None
    valid_batch = min(per_rank_batch, len(valid_idx) // ctx.world_size)
    if valid_batch >= 2:  # the validation loss needs at least one pair of negatives per rank
        valid = _two_view_loader(cfg, ctx, valid_idx, valid_batch, cfg.seed + 1, images, source)
    return PretrainData(train, valid, build_augment(cfg), labeled)
