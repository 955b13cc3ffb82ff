"""Torchvision fallback two-view loader: shapes, distinct views, seeded crops, resume, rank shards."""
import numpy as np
import pytest
import torch

from data.sources import open_source
from data.torchvision_loader import TorchvisionTwoViewLoader
from data.views import Shard, ViewCrop


def id_images(count=64):
    """Image i is filled with the value 3*i: any crop of it still says which it is."""
    return [(np.full((12, 10, 3), 3 * i, dtype=np.uint8), i % 4) for i in range(count)]


def take(loader, epoch=0, start_step=0, count=2):
    batches = loader.batches(epoch, start_step)
    out = [next(batches) for _ in range(count)]
    batches.close()
    return out


@pytest.fixture(scope="module")
def digits():
    return open_source("digits")


def test_views_have_the_shape_and_differ(digits):
    loader = TorchvisionTwoViewLoader(digits, 32, ViewCrop(16), Shard(seed=3))
    assert loader.steps_per_epoch == 1797 // 32
    v1, v2 = take(loader, count=1)[0]
    assert v1.shape == v2.shape == (32, 3, 16, 16) and v1.dtype == v2.dtype == torch.uint8
    assert (v1 != v2).float().mean() > 0.3


def test_seed_fixes_batches_across_runs_and_worker_counts(digits):
    a = take(TorchvisionTwoViewLoader(digits, 32, ViewCrop(16), Shard(seed=3)))
    b = take(TorchvisionTwoViewLoader(digits, 32, ViewCrop(16), Shard(seed=3), num_workers=2))
    for (a1, a2), (b1, b2) in zip(a, b):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    other_epoch = take(TorchvisionTwoViewLoader(digits, 32, ViewCrop(16), Shard(seed=3)), epoch=1, count=1)[0]
    other_seed = take(TorchvisionTwoViewLoader(digits, 32, ViewCrop(16), Shard(seed=4)), count=1)[0]
    assert not torch.equal(other_epoch[0], a[0][0]) and not torch.equal(other_seed[0], a[0][0])


def test_resume_from_a_step_gives_the_same_batches(digits):
    loader = TorchvisionTwoViewLoader(digits, 32, ViewCrop(16), Shard(seed=3))
    full, resumed = take(loader, epoch=2, count=3), take(loader, epoch=2, start_step=2, count=1)[0]
    assert torch.equal(full[2][0], resumed[0]) and torch.equal(full[2][1], resumed[1])
    assert sum(1 for _ in loader.batches(0, start_step=loader.steps_per_epoch - 1)) == 1


def test_indices_subset_and_too_small():
    loader = TorchvisionTwoViewLoader(id_images(), 4, ViewCrop(6, scale=(0.5, 1.0)), Shard(indices=torch.arange(8, 16)))
    seen = sorted(int(v[0, 0, 0]) // 3 for view1, _ in loader.batches(0) for v in view1)
    assert loader.steps_per_epoch == 2 and seen == list(range(8, 16))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        TorchvisionTwoViewLoader(id_images(), 64, ViewCrop(6), Shard(world_size=2))


def _shard(rank, world_size):
    loader = TorchvisionTwoViewLoader(id_images(), 8, ViewCrop(6), Shard(rank, world_size, seed=1))
    assert loader.steps_per_epoch == 4
    return [[sorted(int(v[0, 0, 0]) // 3 for v in view1) for view1, _ in loader.batches(epoch)] for epoch in (0, 1)]


def test_two_ranks_get_disjoint_shards_covering_the_set(distributed_run):
    shards = distributed_run(_shard, 2)
    for epoch in (0, 1):
        ids = [sum(shards[rank][epoch], []) for rank in (0, 1)]
        assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(64))
    assert shards[0][0] != shards[0][1]


@pytest.mark.parametrize("flip_prob,flipped", [(0.0, False), (1.0, True)])
def test_flip_prob(flip_prob, flipped):
    """Identical left-to-right ramps, full-image crops: only a flip can change a view."""
    ramp = np.broadcast_to((np.arange(8, dtype=np.uint8) * 30)[None, :, None], (8, 8, 3)).copy()
    loader = TorchvisionTwoViewLoader([(ramp, 0)] * 32, 16, ViewCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                                                    flip_prob=flip_prob), Shard(seed=0))
    expected = torch.from_numpy(ramp).permute(2, 0, 1)
    expected = expected.flip(-1) if flipped else expected
    for view in take(loader, count=1)[0]:
        assert torch.equal(view, expected.expand_as(view))
