"""Labeled image sources on disk in their native formats: digits, CIFAR-10/100, STL10, ImageFolder (via torchvision)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("digits", "cifar10", "cifar100", "stl10", "imagefolder")
STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")


class DigitsSource:
    """scikit-learn's bundled digits as 8x8 RGB PIL images (no download)."""

    def __init__(self):
        from data.digits import load_digits_uint8

        images, labels = load_digits_uint8(None)
        self.images, self.labels = images.permute(0, 2, 3, 1).numpy(), labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), self.labels[i]


def open_source(name: str, root: str | Path | None = None, split: str = "train", download: bool = False):
    """A sequence of (PIL image, int label); errors name the missing or empty path.

    cifar10 / cifar100: torchvision's on-disk format (root/cifar-10-batches-py, root/cifar-100-python);
    stl10: root/stl10_binary, split train | test | unlabeled | train+unlabeled (labels of unlabeled images: -1);
    imagefolder: root/<class>/<image> (ImageNet layout; split ignored). download=True fetches with torchvision.
    """
    if name == "digits":
        return DigitsSource()
    if name not in NAMES:
        raise ValueError(f"dataset {name!r}: choose one of {', '.join(NAMES)}")
    if root is None or (not download and not Path(root).exists()):
        raise FileNotFoundError(f"data directory {root}: does not exist (for {name}; pass --download to fetch it)")
    import torchvision.datasets as tvd

    try:
        if name in ("cifar10", "cifar100"):
            if split not in ("train", "test"):
                raise ValueError(f"split {split!r}: {name} has train and test")
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            source = cls(str(root), train=split == "train", download=download)
        elif name == "stl10":
            if split not in STL10_SPLITS:
                raise ValueError(f"split {split!r}: STL10 has {', '.join(STL10_SPLITS)}")
            source = tvd.STL10(str(root), split=split, download=download)
        else:
            source = tvd.ImageFolder(str(root))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"data directory {root}: no {name} data there ({err})") from None
    if len(source) == 0:
        raise FileNotFoundError(f"data directory {root}: no images found for {name}")
    return source


def image_path(source, index: int) -> str | None:
    """The file behind sample `index` when the source reads files (ImageFolder), for error messages."""
    samples = getattr(source, "samples", None)
    return samples[index][0] if samples is not None else None


def as_rgb_array(image) -> np.ndarray:
    """HWC uint8 RGB from a PIL image or an array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.uint8)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
