"""Builds what the loop consumes from the config: two-view train/valid loaders and the labeled split for monitoring."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.augment import SimCLRAugment
from data.digits import load_digits_uint8, synthetic_images
from data.memory_loader import MemoryTwoViewLoader, split_indices
from trainer.config import Config
from trainer.distributed import DistContext
from trainer.probe import stratified_split

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


def _valid_loader(images, indices, per_rank_batch: int, cfg: Config, ctx: DistContext):
    """Validation loader over the held-out indices, its batch shrunk to fit; None when too few images."""
    batch = min(per_rank_batch, len(indices) // ctx.world_size)
    if batch < 2:
        return None
    return MemoryTwoViewLoader(images, batch, cfg.dataset.image_size, ctx.rank, ctx.world_size,
                               seed=cfg.seed + 1, indices=indices, scale=(cfg.dataset.crop_min_scale, 1.0))


def build_pretrain_data(cfg: Config, ctx: DistContext) -> PretrainData:
    per_rank_batch = cfg.batch_size // ctx.world_size
    if cfg.dataset.loader != "memory":
        raise NotImplementedError(f"dataset.loader={cfg.dataset.loader}: not available in this build")
    images, labels = _in_memory(cfg)
    # The probe's test images are never seen in pretraining, not even unlabeled.
    pool, test = stratified_split(labels, cfg.eval.test_fraction, seed=cfg.seed)
    train_rel, valid_rel = split_indices(len(pool), cfg.dataset.valid_size, seed=cfg.seed)
    train_idx, valid_idx = pool[train_rel], pool[valid_rel]
    scale = (cfg.dataset.crop_min_scale, 1.0)
    train = MemoryTwoViewLoader(images, per_rank_batch, cfg.dataset.image_size, ctx.rank, ctx.world_size,
                                seed=cfg.seed, indices=train_idx, scale=scale)
    valid = _valid_loader(images, valid_idx, per_rank_batch, cfg, ctx) if len(valid_idx) else None
    labeled = LabeledSplit(images[pool], labels[pool], images[test], labels[test])
    return PretrainData(train, valid, build_augment(cfg), labeled)
