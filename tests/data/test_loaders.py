"""Two-view loaders (memory, torchvision, FFCV): shapes, distinct views, disjoint rank shards, determinism."""
import pytest
import torch

from data.digits import load_digits_uint8
from data.memory_loader import MemoryTwoViewLoader
from data.sources import open_source
from data.torchvision_loader import TorchvisionTwoViewLoader


@pytest.fixture(scope="module")
def digits_beton(tmp_path_factory):
    pytest.importorskip("ffcv", reason="FFCV is not installed (bash launch/install.sh --ffcv)")
    from data.prepare import prepare

    path = tmp_path_factory.mktemp("beton") / "digits.beton"
    prepare("digits", path, num_workers=1)
    return path


def make(kind, rank=0, world_size=1, seed=0, beton=None, indices=None):
    if kind == "memory":
        images, _ = load_digits_uint8(16)
        return MemoryTwoViewLoader(images, 32, 16, rank, world_size, seed, indices=indices)
    if kind == "torchvision":
        return TorchvisionTwoViewLoader(open_source("digits"), 32, 16, rank, world_size, seed, indices=indices)
    from data.ffcv_loader import FFCVTwoViewLoader
    return FFCVTwoViewLoader(str(beton), 32, 16, rank, world_size, seed, num_workers=1, indices=indices)


def first_batch(loader, epoch=0):
    batches = loader.batches(epoch)
    batch = next(batches)
    batches.close()
    return batch


@pytest.mark.parametrize("kind", ["memory", "torchvision", "ffcv"])
def test_views_shape_dtype_and_differ(kind, request):
    beton = request.getfixturevalue("digits_beton") if kind == "ffcv" else None
    v1, v2 = first_batch(make(kind, beton=beton))
    assert v1.shape == v2.shape == (32, 3, 16, 16) and v1.dtype == v2.dtype == torch.uint8
    assert (v1 != v2).float().mean() > 0.3  # independent crops of the same images


@pytest.mark.parametrize("kind", ["memory", "torchvision"])
def test_fixed_seed_same_batch_other_epoch_differs(kind):
    a, b = first_batch(make(kind, seed=3)), first_batch(make(kind, seed=3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first_batch(make(kind, seed=3), epoch=1)[0], a[0])


def test_ffcv_fixed_seed_same_order(digits_beton):
    """FFCV 1.0.2 draws crops from numba's global state: the order (which images) is what a seed fixes."""
    from data.ffcv_loader import FFCVTwoViewLoader

    a = FFCVTwoViewLoader(str(digits_beton), 32, 8, seed=5, num_workers=1, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    b = FFCVTwoViewLoader(str(digits_beton), 32, 8, seed=5, num_workers=1, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x, y = first_batch(a)[0], first_batch(b)[0]
    # full-image crops: only the flip is random, so compare flip-invariant content
    assert torch.equal(x.float() + x.flip(-1).float(), y.float() + y.flip(-1).float())


def _shard_ids(rank, world_size, kind, beton):
    """Per-rank sample ids seen in one epoch: image i is filled with the value i (crops keep it)."""
    if kind == "memory":
        loader = MemoryTwoViewLoader(torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 8, 8)
                                     .contiguous(), 8, 8, rank, world_size, seed=1, scale=(1.0, 1.0))
    else:
        loader = TorchvisionTwoViewLoader([(torch.full((8, 8, 3), i, dtype=torch.uint8).numpy(), 0) for i in range(64)],
                                          8, 8, rank, world_size, seed=1, scale=(1.0, 1.0))
    return sorted(int(v1[j, 0, 0, 0]) for v1, _ in loader.batches(0) for j in range(len(v1)))


@pytest.mark.parametrize("kind", ["memory", "torchvision"])
def test_two_ranks_get_disjoint_shards_covering_the_set(distributed_run, kind):
    shards = distributed_run(_shard_ids, 2, kind, None)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(64))


def _ffcv_shard(rank, world_size, beton):
    from data.ffcv_loader import FFCVTwoViewLoader

    loader = FFCVTwoViewLoader(str(beton), 16, 8, rank, world_size, seed=1, num_workers=1)
    return loader.loader.traversal_order.sample_order(0)[: loader.steps_per_epoch * 16].tolist()


def test_ffcv_two_ranks_disjoint(distributed_run, digits_beton):
    shards = distributed_run(_ffcv_shard, 2, digits_beton)
    assert len(shards[0]) == len(shards[1]) > 0 and not set(shards[0]) & set(shards[1])


def test_ffcv_missing_gives_install_hint(monkeypatch):
    import importlib.util

    from data import ffcv_loader
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ffcv" else real(name, *a))
    with pytest.raises(ImportError, match="launch/install.sh --ffcv"):
        ffcv_loader.FFCVTwoViewLoader("x.beton", 4, 8)
