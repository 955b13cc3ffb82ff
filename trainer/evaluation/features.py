"""Frozen-feature extraction in dataset order, sharded across ranks without sampler padding, gathered to all."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of rank's share: sizes differ by at most one, no sample twice."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _batch(source, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(source, torch.Tensor):
        return source[start:stop], None
    items = [source[i] for i in range(start, stop)]  # a Dataset of (image, label)
    images = torch.stack([torch.as_tensor(img) for img, _ in items])
    return images, torch.as_tensor([int(label) for _, label in items])


@torch.no_grad()
def extract_features(model: nn.Module, source, batch_size: int = 256, device: torch.device | str = "cpu",
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features [N, d] (float32, CPU) of `source` (an image tensor [N, C, H, W] or a Dataset of (image, label))
    in source order, and the labels for a Dataset (None for a tensor).

    Under torch.distributed each rank runs its contiguous share; the shares are gathered so that every rank
    returns all N rows exactly once. The model runs in eval mode (restored afterwards)."""
    device = torch.device(device)
    count = len(source)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    start, stop = shard_bounds(count, rank, world)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for lo in range(start, stop, batch_size):
            images, batch_labels = _batch(source, lo, min(lo + batch_size, stop))
            images = images.to(device, non_blocking=True)
            if transform is not None:
                images = transform(images)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                feats.append(model(images).float())
            if batch_labels is not None:
                labels.append(batch_labels)
    finally:
        model.train(was_training)
    if not feats:  # an empty share still has to take part in the gather: learn d from one sample
        probe, _ = _batch(source, 0, 1)
        probe = probe.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            dim = model.eval()(transform(probe) if transform else probe).shape[1]
        model.train(was_training)
        local = torch.zeros(0, dim, device=device)
    else:
        local = torch.cat(feats)
    local_labels = torch.cat(labels) if labels else None
    if world > 1:
        local = _gather_rows(local, count, world)
        if local_labels is not None:
            local_labels = _gather_rows(local_labels.to(device).view(-1, 1).float(), count, world).view(-1).long()
    return local.cpu(), (local_labels.cpu() if local_labels is not None else None)


def _gather_rows(local: torch.Tensor, count: int, world: int) -> torch.Tensor:
    """all_gather of per-rank row blocks of unequal length (padded to the longest, then trimmed)."""
    longest = shard_bounds(count, 0, world)[1]
    padded = torch.zeros(longest, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    sizes = [shard_bounds(count, r, world) for r in range(world)]
    return torch.cat([part[:stop - start] for part, (start, stop) in zip(parts, sizes)])
