"""Labeled image sources read from their native on-disk formats: digits, CIFAR-10/100, STL10, ImageFolder."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("digits", "cifar10", "cifar100", "stl10", "imagefolder")
STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
_CIFAR = {  # name: (folder, train files, test files, label key) as torchvision downloads them
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


DATA_ROOT_ENV = "SIMCLR_DATA"  # where the data sets live when not in ./datasets (a disk, a cluster's share)


def resolve_data_path(path: str | os.PathLike | None) -> str | None:
    """Where a data path points: the one rule for dataset.path, trainer.eval's and data.prepare's paths.

    Data sets live outside the Python package `data/`, under a data root: $SIMCLR_DATA when set, else the
    git-ignored ./datasets of the working directory. A relative path that starts with `datasets/` names a file
    or folder under that root (`datasets/stl10/train_unlabeled.beton` is $SIMCLR_DATA/stl10/train_unlabeled.beton);
    any other path is used as written. Without SIMCLR_DATA every path stays as written. The result is made
    absolute when the root is, so resolving twice changes nothing. None and "" stay as they are.
    """
    if path is None or str(path) == "":
        return path
    parts = Path(path).parts
    root = os.environ.get(DATA_ROOT_ENV, "")
    if not root or Path(path).is_absolute() or parts[0] != "datasets":
        return str(path)
    return str(Path(root).expanduser().absolute().joinpath(*parts[1:]))


class ArraySource:
    """(HWC uint8 array, int label) pairs over an [N, H, W, 3] array (or memmap) and N labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return np.ascontiguousarray(self.images[i]), int(self.labels[i])


class _STL10Part:
    """One STL10 binary file as a memmap (96x96 images stored column-major CHW), labels 1-based on disk."""

    def __init__(self, x_path: Path, y_path: Path | None):
        side = 96 * 96 * 3
        size = _existing(x_path).stat().st_size
        if size == 0 or size % side:
            raise ValueError(f"{x_path}: {size} bytes is not a whole number of 96x96 RGB images")
        self.images = np.memmap(x_path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
        self.labels = (np.fromfile(_existing(y_path), dtype=np.uint8).astype(np.int64) - 1 if y_path
                       else np.full(len(self.images), -1, dtype=np.int64))
        if len(self.labels) != len(self.images):
            raise ValueError(f"{y_path}: {len(self.labels)} labels for {len(self.images)} images in {x_path}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return np.ascontiguousarray(self.images[i].transpose(2, 1, 0)), int(self.labels[i])


class _Concat:
    def __init__(self, parts):
        self.parts, self.starts = parts, np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def digits_source() -> ArraySource:
    """scikit-learn's bundled digits as 8x8 RGB images (no download)."""
    from data.digits import load_digits_uint8

    images, labels = load_digits_uint8(None)
    return ArraySource(images.permute(0, 2, 3, 1).numpy(), labels.numpy())


def cifar_source(name: str, root: Path, split: str) -> ArraySource:
    """CIFAR-10/100 from torchvision's on-disk pickles (root/cifar-10-batches-py, root/cifar-100-python)."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: {name} has train and test")
    folder, train, test, label_key = _CIFAR[name]
    images, labels = [], []
    for file in train if split == "train" else test:
        with open(_existing(root / folder / file), "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[label_key])
    return ArraySource(np.concatenate(images), np.array(labels))


def stl10_source(root: Path, split: str):
    """STL10 from root/stl10_binary; labels 0-9, -1 for the unlabeled images."""
    if split not in STL10_SPLITS:
        raise ValueError(f"split {split!r}: STL10 has {', '.join(STL10_SPLITS)}")
    folder = root / "stl10_binary"
    parts = [_STL10Part(folder / f"{s}_X.bin", folder / f"{s}_y.bin" if s != "unlabeled" else None)
             for s in split.split("+")]
    return parts[0] if len(parts) == 1 else _Concat(parts)


def _download(name: str, root: Path, split: str) -> None:
    import torchvision.datasets as tvd

    if name in _CIFAR:
        (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(str(root), train=split == "train", download=True)
    elif name == "stl10":
        tvd.STL10(str(root), split=split, download=True)
    else:
        raise ValueError(f"--download: {name} has no download; put the images under {root}")


def open_source(name: str, root: str | Path | None = None, split: str = "train", download: bool = False):
    """A sequence of (PIL image or HWC uint8 array, int label); missing or empty inputs raise naming the path.

    cifar10 / cifar100: torchvision's on-disk format under root; stl10: root/stl10_binary, split train | test |
    unlabeled | train+unlabeled; imagefolder: root/<class>/<image> (ImageNet layout, split ignored).
    download=True fetches CIFAR / STL10 with torchvision first.
    """
    if name == "digits":
        return digits_source()
    if name not in NAMES:
        raise ValueError(f"dataset {name!r}: choose one of {', '.join(NAMES)}")
    if root is None:
        raise FileNotFoundError(f"{name}: no data directory given (--data-dir)")
    root = Path(root)
    if download:
        _download(name, root, split)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (for {name}; --download fetches CIFAR and STL10)")
    if name in _CIFAR:
        source = cifar_source(name, root, split)
    elif name == "stl10":
        source = stl10_source(root, split)
    else:
        from torchvision.datasets import ImageFolder

        try:
            source = ImageFolder(str(root))
        except FileNotFoundError as err:  # torchvision: no class folders / no image files
            raise FileNotFoundError(f"{root}: no images in the ImageFolder layout root/<class>/<image> ({err})") \
                from None
    if len(source) == 0:
        raise FileNotFoundError(f"{root}: no images found for {name}")
    return source


def image_path(source, index: int) -> str | None:
    """The file behind sample `index` when the source reads files (ImageFolder), for error messages."""
    samples = getattr(source, "samples", None)
    return samples[index][0] if samples is not None else None


def as_rgb_array(image) -> np.ndarray:
    """HWC uint8 RGB from a PIL image or an array (gray arrays are repeated to 3 channels)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.uint8)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
