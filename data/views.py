"""What every two-view loader is given besides its images: the crop each view gets (ViewCrop) and the part of the
data this rank reads, in which order (Shard)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ViewCrop:
    """The random-resized crop + horizontal flip of each view: a square of side `image_size` from a box whose area
    is a fraction in `scale` of the image and whose aspect ratio is in `ratio` (torchvision's RandomResizedCrop
    ranges), mirrored with probability `flip_prob` (0 where a mirror image is another class, as for digits)."""

    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5


@dataclass(frozen=True, eq=False)  # eq=False: `indices` may be a tensor, whose == is elementwise
class Shard:
    """Rank `rank` of `world_size` reads its DistributedSampler(shuffle, seed, drop_last) share of `indices`
    (None: every sample) each epoch; `seed` fixes that order and the crops."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0
    indices: Sequence[int] | None = None
