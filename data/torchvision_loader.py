"""Two-view loader without FFCV: PIL decode + random-resized crop + flip in DataLoader workers, DistributedSampler."""
from __future__ import annotations

from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from data.seeding import position_seed
from data.sources import as_rgb_array
from data.views import Shard, ViewCrop


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGINT to their rank: torchrun and SLURM signal whole process groups, and
    a worker killed by the stop signal would fail the rank instead of letting it checkpoint."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class _EpochSampler(Sampler):
    """Yields (epoch, index) so that workers (persistent ones too) know which epoch a sample belongs to."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration is epoch `epoch`, without its first `skip` samples (never loaded)."""
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return len(self.sampler)


class _TwoViews(Dataset):
    """Item (epoch, i) -> two uint8 CHW crops + flips of source[indices[i]]."""

    def __init__(self, source, indices, crop: ViewCrop, seed: int):
        from torchvision.transforms import v2

        self.source, self.indices, self.seed = source, indices, seed
        self.transform = v2.Compose([v2.RandomResizedCrop(crop.image_size, crop.scale, crop.ratio, antialias=True),
                                     v2.RandomHorizontalFlip(crop.flip_prob)])
        self.pil_to_tensor = v2.functional.pil_to_tensor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        epoch, i = item
        index = int(self.indices[i])
        image, _ = self.source[index]
        if isinstance(image, Image.Image):
            chw = self.pil_to_tensor(image.convert("RGB"))
        else:
            chw = torch.from_numpy(as_rgb_array(image)).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):  # crops from (seed, epoch, dataset index): any worker count
            torch.manual_seed(position_seed(self.seed, epoch, index))
            return self.transform(chw), self.transform(chw)


class TorchvisionTwoViewLoader:
    """Yields (view1, view2) uint8 [batch_size, 3, S, S] for this rank: the fallback when FFCV is unavailable.

    Same distribution as the FFCV loader (random-resized crop + flip per view; color work happens on the
    device). Order: DistributedSampler(shuffle, seed, drop_last) per epoch; crops: a pure function of
    (seed, epoch, sample), so resumed runs and any worker count see the same batches.
    """

    def __init__(self, dataset, batch_size: int, crop: ViewCrop, shard: Shard | None = None, num_workers: int = 0,
                 device: torch.device | str = "cpu"):
        shard = shard or Shard()
        indices = list(range(len(dataset))) if shard.indices is None else [int(i) for i in shard.indices]
        views = _TwoViews(dataset, indices, crop, shard.seed)
        self.sampler = _EpochSampler(DistributedSampler(views, num_replicas=shard.world_size, rank=shard.rank,
                                                        shuffle=True, seed=shard.seed, drop_last=True))
        self.device = torch.device(device)
        self.loader = DataLoader(views, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 drop_last=True, pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0, worker_init_fn=_ignore_stop_signals)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(indices)} images cannot fill one batch of {batch_size} on {shard.world_size} "
                             "ranks")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from `start_step` on; skipped batches are never loaded (crops do not depend on
        the position in the epoch, so they equal those of an uninterrupted epoch)."""
        self.sampler.set_epoch(epoch, skip=start_step * self.loader.batch_size)
        for view1, view2 in self.loader:
            yield view1.to(self.device, non_blocking=True), view2.to(self.device, non_blocking=True)
