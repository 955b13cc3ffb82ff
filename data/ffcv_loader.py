"""Two-view FFCV loader: each stored image decoded with two independent random-resized crops + flips (uint8 out)."""
from __future__ import annotations

from typing import Iterator

import torch

INSTALL_HINT = "FFCV is not installed: run `bash launch/install.sh --ffcv` (or `pip install -e .[ffcv]`)"


def _import_ffcv():
    import importlib.util

    if importlib.util.find_spec("ffcv") is None:
        raise ImportError(INSTALL_HINT)


def beton_size(path: str) -> int:
    """Number of samples stored in a .beton."""
    _import_ffcv()
    from ffcv.reader import Reader

    return int(Reader(str(path)).num_samples)


class FFCVTwoViewLoader:
    """Yields (view1, view2) uint8 [batch_size, 3, S, S] for this rank from a .beton written by data.prepare.

    Both views come from one stored image: two pipelines on the 'image' field, each FFCV's
    RandomResizedCropRGBImageDecoder (decode + crop + resize in one step) and RandomHorizontalFlip. Sample
    order: random per epoch from `seed` (FFCV's distributed mode emulates DistributedSampler and needs the
    torch.distributed process group, which the trainer starts first), drop_last. On CUDA the views are copied
    to the device non-blocking. FFCV 1.0.2 draws crop parameters from numba's global random state, so the crops
    (not the order) differ between runs; `start_step` skips batches of the epoch for a resumed run.
    """

    def __init__(self, beton_path: str, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 4, device: torch.device | str = "cpu", indices=None,
                 os_cache: bool = True, order: str = "random", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        _import_ffcv()
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        device = torch.device(device)

        def view() -> PipelineSpec:
            transforms = [RandomHorizontalFlip(), ToTensor(), ToTorchImage(channels_last=False)]
            if device.type == "cuda":
                transforms.append(ToDevice(device, non_blocking=True))
            return PipelineSpec("image", decoder=RandomResizedCropRGBImageDecoder((image_size, image_size), scale,
                                                                                  ratio), transforms=transforms)

        if order not in ("random", "quasi_random"):
            raise ValueError(f"order={order!r}: choose random or quasi_random")
        if order == "quasi_random" and world_size > 1:
            raise ValueError("order=quasi_random is not available with several ranks in FFCV 1.0.2: use random")
        self.loader = Loader(str(beton_path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=OrderOption.RANDOM if order == "random" else OrderOption.QUASI_RANDOM,
                             distributed=world_size > 1, seed=seed, indices=indices, drop_last=True,
                             pipelines={"image": view(), "image2": view(), "label": None})
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{beton_path}: too few images for one batch of {batch_size} per rank")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.next_epoch = epoch  # FFCV's order for an epoch is a function of (seed, epoch)
        iterator = iter(self.loader)
        try:
            for step, (view1, view2) in enumerate(iterator):
                if step >= start_step:
                    yield view1, view2
        finally:  # stop FFCV's worker thread when the caller leaves the epoch early
            iterator.close()
            iterator.join(timeout=10)
