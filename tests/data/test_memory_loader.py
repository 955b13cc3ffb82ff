"""What only the in-memory loader does: it takes a uint8 image tensor (and says so otherwise) and crops on the
tensor's device with data.crop, flipping each view with flip_prob. The behaviour all loaders share (views,
shards, seeding, resume, crop options) is tests/data/test_loaders.py."""
import pytest
import torch

from data.memory_loader import MemoryTwoViewLoader
from data.views import Shard, ViewCrop


@pytest.mark.parametrize("images,problem", [(torch.zeros(8, 3, 8, 8), "torch.float32"),
                                            (torch.zeros(8, 8, 8, dtype=torch.uint8), r"\(8, 8, 8\)")])
def test_images_must_be_a_uint8_nchw_tensor(images, problem):
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, C, H, W\], got .*" + problem):
        MemoryTwoViewLoader(images, 4, ViewCrop(8))


def test_flip_prob_one_half_mirrors_about_half_the_views_and_nothing_else():
    """Left-to-right ramps, whole-image crops: each view is its image or its mirror image, about half of each."""
    ramp = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8) * 30
    images = ramp.expand(256, 3, 8, 8).contiguous()
    loader = MemoryTwoViewLoader(images, 128, ViewCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.5),
                                 Shard(seed=4))
    views = torch.cat([torch.cat(pair) for pair in loader.batches(0)])
    assert len(views) == 512
    flipped = (views == images[0].flip(-1)).flatten(1).all(1)
    assert ((views == images[0]).flatten(1).all(1) | flipped).all()
    assert abs(flipped.float().mean() - 0.5) < 4 * (0.25 / len(views)) ** 0.5
