"""Two-view loader over an in-memory uint8 image tensor (digits, synthetic): sharded by DistributedSampler, crops
batched."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DistributedSampler

from data.crop import random_resized_crop_flip
from data.seeding import position_seed
from data.views import Shard, ViewCrop


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class MemoryTwoViewLoader:
    """Yields (view1, view2) uint8 [batch_size, 3, S, S] after the random-resized crop + flip of `crop`, for this
    rank's `shard`.

    The order of epoch e is DistributedSampler(shuffle, seed, drop_last) with set_epoch(e); the crops of step k
    come from a generator seeded with (seed, rank, epoch, k): a pure function of the position, so a resumed run
    sees exactly the batches an uninterrupted one would. batch_size is per rank.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, crop: ViewCrop, shard: Shard | None = None,
                 device: torch.device | str = "cpu"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        shard = shard or Shard()
        self.images, self.batch_size, self.crop = images, batch_size, crop
        self.indices = torch.arange(images.shape[0]) if shard.indices is None else torch.as_tensor(shard.indices)
        self.rank, self.seed, self.device = shard.rank, shard.seed, torch.device(device)
        self.sampler = DistributedSampler(_Sized(len(self.indices)), num_replicas=shard.world_size, rank=shard.rank,
                                          shuffle=True, seed=shard.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.indices)} images cannot fill one batch of {batch_size} per rank "
                             f"on {shard.world_size} ranks: lower batch_size")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        order = torch.as_tensor(list(self.sampler))
        for step in range(start_step, self.steps_per_epoch):
            chosen = self.indices[order[step * self.batch_size:(step + 1) * self.batch_size]]
            batch = self.images[chosen].to(self.device, non_blocking=True)
            g = torch.Generator(device=batch.device)
            g.manual_seed(position_seed(self.seed, self.rank, epoch, step))
            views = [random_resized_crop_flip(batch, self.crop.image_size, generator=g, scale=self.crop.scale,
                                              ratio=self.crop.ratio, flip_prob=self.crop.flip_prob) for _ in range(2)]
            yield views[0], views[1]
