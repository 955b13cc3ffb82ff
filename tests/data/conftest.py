"""The small images every two-view loader is tested on, in the three forms the loaders read: a uint8 tensor in
memory, an ImageFolder of PNG files, and a .beton that data.prepare wrote from that folder (built once per session:
writing it and compiling FFCV's pipeline cost seconds)."""
import numpy as np
import pytest
import torch

ID_COUNT, ID_SIDE = 64, 16
ID_STEP = 3  # image i's red channel holds ID_STEP * i


def read_ids(views) -> list[int]:
    """The image each view [n, 3, S, S] was cropped from, from its red channel (constant within an image, and a
    resize keeps a constant exactly)."""
    return [int(v) // ID_STEP for v in views[:, 0, 0, 0]]


def same_batches(batches, others) -> bool:
    """Two lists of (view1, view2) batches are equal, pixel for pixel."""
    return len(batches) == len(others) and all(torch.equal(a1, b1) and torch.equal(a2, b2)
                                               for (a1, a2), (b1, b2) in zip(batches, others))


@pytest.fixture(scope="session")
def id_images() -> np.ndarray:
    """uint8 [64, 16, 16, 3]: image i has red = 3 * i (which image a crop came from), green = 15 * column (a flip
    reverses it; a crop's width shows in its span) and blue = 15 * row."""
    ramp = np.arange(ID_SIDE, dtype=np.uint8) * 15
    images = np.empty((ID_COUNT, ID_SIDE, ID_SIDE, 3), dtype=np.uint8)
    images[..., 0] = (np.arange(ID_COUNT, dtype=np.uint8) * ID_STEP)[:, None, None]
    images[..., 1] = ramp[None, None, :]
    images[..., 2] = ramp[None, :, None]
    return images


@pytest.fixture(scope="session")
def id_folder(id_images, tmp_path_factory) -> str:
    """id_images as PNG files in the ImageFolder layout, four classes of 16 named so that ImageFolder's sample i is
    image i."""
    from PIL import Image

    root = tmp_path_factory.mktemp("id_folder")
    for i, image in enumerate(id_images):
        folder = root / f"class{i // 16}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return str(root)


@pytest.fixture(scope="session")
def id_beton(id_folder, tmp_path_factory) -> str:
    """id_folder written by data.prepare as raw (lossless) pixels."""
    pytest.importorskip("ffcv", reason="FFCV is not installed (bash launch/install.sh --ffcv)")
    from data.prepare import ImageEncoding, prepare

    path = tmp_path_factory.mktemp("beton") / "ids.beton"
    prepare("imagefolder", path, data_dir=id_folder, encoding=ImageEncoding("raw"), num_workers=1)
    return str(path)
