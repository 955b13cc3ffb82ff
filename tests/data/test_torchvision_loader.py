"""What only the torchvision loader does: it decodes PIL images and HWC arrays alike, and DataLoader workers (any
number, persistent across epochs) deliver the batches one process would. The behaviour all loaders share (views,
shards, seeding, resume, crop options) is tests/data/test_loaders.py."""
import torch
from PIL import Image

from data.sources import ArraySource, open_source
from data.torchvision_loader import TorchvisionTwoViewLoader
from data.views import Shard, ViewCrop
from tests.data.conftest import ID_SIDE, same_batches


def epochs(loader, *epochs_and_starts):
    return [list(loader.batches(epoch, start)) for epoch, start in epochs_and_starts]


def test_pil_images_arrays_and_gray_images_give_the_same_views(id_images, id_folder):
    """ImageFolder's PIL images, the same pixels as HWC arrays, and (for gray pixels) mode-L images and 2-D arrays:
    the same batches."""
    labels = list(range(len(id_images)))
    crop, shard = ViewCrop(ID_SIDE), Shard(seed=3)
    from_files = TorchvisionTwoViewLoader(open_source("imagefolder", id_folder), 8, crop, shard)
    from_arrays = TorchvisionTwoViewLoader(ArraySource(id_images, labels), 8, crop, shard)
    assert same_batches(list(from_files.batches(1)), list(from_arrays.batches(1)))
    gray = id_images[..., 1]  # the column ramp
    as_l = TorchvisionTwoViewLoader([(Image.fromarray(g), 0) for g in gray], 8, crop, shard)
    as_2d = TorchvisionTwoViewLoader([(g, 0) for g in gray], 8, crop, shard)
    batches = list(as_l.batches(0))
    assert same_batches(batches, list(as_2d.batches(0)))
    v1 = batches[0][0]
    assert torch.equal(v1[:, 0], v1[:, 1]) and torch.equal(v1[:, 0], v1[:, 2])  # gray repeated to RGB


def test_any_worker_count_gives_the_batches_of_one_process(id_folder):
    """Two persistent workers over two epochs, the second resumed at step 1, against no workers."""
    source = open_source("imagefolder", id_folder)
    crop, shard = ViewCrop(ID_SIDE), Shard(1, 2, seed=3)
    alone = epochs(TorchvisionTwoViewLoader(source, 8, crop, shard), (0, 0), (1, 0))
    workers = epochs(TorchvisionTwoViewLoader(source, 8, crop, shard, num_workers=2), (0, 0), (1, 1))
    assert same_batches(workers[0], alone[0]) and same_batches(workers[1], alone[1][1:])
    assert not same_batches(alone[0][1:], alone[1][1:])  # so the workers saw the epoch change
