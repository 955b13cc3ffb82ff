"""In-memory two-view loader (digits, synthetic): shapes, distinct views, seeding, rank shards, flip_prob."""
import torch

from data.digits import load_digits_uint8
from data.memory_loader import MemoryTwoViewLoader
from data.views import Shard, ViewCrop


def first_batch(loader, epoch=0):
    return next(iter(loader.batches(epoch)))


def digits_loader(seed=0):
    images, _ = load_digits_uint8(16)
    return MemoryTwoViewLoader(images, 32, ViewCrop(16), Shard(seed=seed))


def test_views_shape_dtype_and_differ():
    v1, v2 = first_batch(digits_loader())
    assert v1.shape == v2.shape == (32, 3, 16, 16) and v1.dtype == v2.dtype == torch.uint8
    assert (v1 != v2).float().mean() > 0.3  # independent crops of the same images


def test_fixed_seed_same_batch_other_epoch_differs():
    a, b = first_batch(digits_loader(seed=3)), first_batch(digits_loader(seed=3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first_batch(digits_loader(seed=3), epoch=1)[0], a[0])


def test_resume_from_a_step_gives_the_same_batches():
    full = list(digits_loader(seed=2).batches(0))
    resumed = list(digits_loader(seed=2).batches(0, start_step=2))
    assert len(resumed) == len(full) - 2
    for (a1, a2), (b1, b2) in zip(full[2:], resumed):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def _asymmetric_images(n=64, side=8):
    """Image i: column c holds value c (a left-to-right ramp): a flip reverses it, full-image crops keep it."""
    ramp = torch.arange(side, dtype=torch.uint8).view(1, 1, 1, side)
    return ramp.expand(n, 3, side, side).contiguous() * 30


def test_flip_prob_zero_never_mirrors_one_always_does():
    images = _asymmetric_images()
    for flip_prob, expect_flipped in ((0.0, False), (1.0, True)):
        loader = MemoryTwoViewLoader(images, 16, ViewCrop(8, scale=(1.0, 1.0), flip_prob=flip_prob))
        for v1, v2 in loader.batches(0):
            for view in (v1, v2):
                expected = images[: len(view)].flip(-1) if expect_flipped else images[: len(view)]
                assert torch.equal(view, expected)
    v1, _ = first_batch(MemoryTwoViewLoader(images, 64, ViewCrop(8, scale=(1.0, 1.0), flip_prob=0.5)))
    flipped = (v1[:, 0, 0, 0] > v1[:, 0, 0, -1]).float().mean()
    assert 0.25 < flipped < 0.75


def _shard_ids(rank, world_size):
    """Per-rank sample ids seen in one epoch: image i is filled with the value i (crops keep it)."""
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 8, 8).contiguous()
    loader = MemoryTwoViewLoader(images, 8, ViewCrop(8, scale=(1.0, 1.0)), Shard(rank, world_size, seed=1))
    return sorted(int(v1[j, 0, 0, 0]) for v1, _ in loader.batches(0) for j in range(len(v1)))


def test_two_ranks_get_disjoint_shards_covering_the_set(distributed_run):
    shards = distributed_run(_shard_ids, 2)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(64))
