"""What every two-view loader promises, checked on the memory, torchvision and FFCV loaders over the same 64 images
(tests/data/conftest.py: image i's red channel says i, green and blue are column and row ramps).

The order contract is torch's DistributedSampler(shuffle, seed, drop_last) over the shard's indices, with the rank
and world size given explicitly (no process group), so the expected sample ids of each batch come from that
sampler here, and the three loaders deliver the same samples in the same order. What only one loader does (FFCV's
reduced JPEG decode and its threads, torchvision's PIL decode and workers, the memory loader's input checks) is
in test_<loader>_loader.py.
"""
import importlib.util

import pytest
import torch
from torch.utils.data import DistributedSampler

from data.views import Shard, ViewCrop
from tests.data.conftest import ID_COUNT, ID_SIDE, read_ids, same_batches

BATCH = 8
NEEDS_FFCV = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="FFCV is not installed (bash launch/install.sh --ffcv)")
KINDS = ["memory", "torchvision", pytest.param("ffcv", marks=NEEDS_FFCV)]
# a second FFCV loader of the same shape compiles its pipeline again (~3 s): such checks are slow for FFCV only
KINDS_SLOW_FFCV = ["memory", "torchvision", pytest.param("ffcv", marks=[NEEDS_FFCV, pytest.mark.slow])]
WHOLE_UNFLIPPED = ViewCrop(ID_SIDE, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
QUARTER_FLIPPED = ViewCrop(ID_SIDE, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_prob=1.0)


def build(kind: str, request, batch_size: int, crop: ViewCrop, shard: Shard):
    """A fresh loader of `kind` over the id images (its data made once per session)."""
    if kind == "memory":
        from data.memory_loader import MemoryTwoViewLoader

        images = torch.from_numpy(request.getfixturevalue("id_images")).permute(0, 3, 1, 2).contiguous()
        return MemoryTwoViewLoader(images, batch_size, crop, shard)
    if kind == "torchvision":
        from data.sources import open_source
        from data.torchvision_loader import TorchvisionTwoViewLoader

        return TorchvisionTwoViewLoader(open_source("imagefolder", request.getfixturevalue("id_folder")), batch_size,
                                        crop, shard)
    from data.ffcv_loader import FFCVTwoViewLoader

    return FFCVTwoViewLoader(request.getfixturevalue("id_beton"), batch_size, crop, shard, num_workers=1)


@pytest.fixture(scope="session")
def shared_loaders():
    """Loaders built by `loader`, kept for the session: an FFCV loader compiles its pipeline at its first epoch."""
    return {}


@pytest.fixture
def loader(request, shared_loaders):
    """loader(kind, crop, shard): the session's loader of that configuration, batches of BATCH."""
    def get(kind: str, crop: ViewCrop, shard: Shard):
        indices = None if shard.indices is None else tuple(int(i) for i in shard.indices)
        key = (kind, crop, shard.rank, shard.world_size, shard.seed, indices)
        if key not in shared_loaders:
            shared_loaders[key] = build(kind, request, BATCH, crop, shard)
        return shared_loaders[key]

    return get


def expected_ids(shard: Shard, epoch: int) -> list[list[int]]:
    """The sample ids of each batch of an epoch: DistributedSampler's order over the shard's indices, in batches."""
    sampler = DistributedSampler(range(ID_COUNT if shard.indices is None else len(shard.indices)),
                                 num_replicas=shard.world_size, rank=shard.rank, shuffle=True, seed=shard.seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    order = [i if shard.indices is None else int(shard.indices[i]) for i in sampler]
    return [order[k:k + BATCH] for k in range(0, len(order) - BATCH + 1, BATCH)]


def first_views_by_id(batches) -> dict[int, torch.Tensor]:
    """Each image's first view in the batches, by image id."""
    return {i: view for v1, _ in batches for i, view in zip(read_ids(v1), v1)}


def mostly_other_crops(views: dict, others: dict) -> bool:
    """More than 80% of the images both dicts hold have different views in them (16 px crops of one image can
    coincide now and then)."""
    common = views.keys() & others.keys()
    return len(common) > 0 and sum(not torch.equal(views[i], others[i]) for i in common) > 0.8 * len(common)


def rank_shard(rank: int) -> Shard:
    return Shard(rank, 2, seed=1)


@pytest.mark.parametrize("kind", KINDS)
def test_two_uint8_views_of_each_image_that_differ(kind, loader):
    """Both views [B, 3, S, S] uint8, view1[j] and view2[j] from the same image, cropped independently."""
    batches = list(loader(kind, ViewCrop(ID_SIDE), rank_shard(0)).batches(0))
    assert len(batches) == ID_COUNT // 2 // BATCH
    for v1, v2 in batches:
        assert v1.shape == v2.shape == (BATCH, 3, ID_SIDE, ID_SIDE) and v1.dtype == v2.dtype == torch.uint8
        assert v1.is_contiguous() and v2.is_contiguous()
        assert read_ids(v1) == read_ids(v2)
    v1, v2 = (torch.cat(views) for views in zip(*batches))
    texture_differs = (v1[:, 1:] != v2[:, 1:]).flatten(1).any(1)  # green and blue: the crop's place and size
    assert texture_differs.float().mean() > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_read_disjoint_shards_covering_the_set_in_distributed_samplers_order(kind, loader):
    """Two ranks, two epochs: each batch holds exactly the ids DistributedSampler gives the rank, so the shards are
    disjoint, cover all 64 images, and are reshuffled each epoch."""
    rank0_order = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            shard = rank_shard(rank)
            ids = [read_ids(v1) for v1, _ in loader(kind, ViewCrop(ID_SIDE), shard).batches(epoch)]
            assert ids == expected_ids(shard, epoch)
            seen += sum(ids, [])
            if rank == 0:
                rank0_order.append(ids)
        assert sorted(seen) == list(range(ID_COUNT))
    assert rank0_order[0] != rank0_order[1]  # the epoch changes the order


@pytest.mark.parametrize("kind", KINDS)
def test_an_epoch_read_twice_gives_the_same_batches_and_another_epoch_other_crops(kind, loader):
    rank0 = loader(kind, ViewCrop(ID_SIDE), rank_shard(0))
    epoch3 = list(rank0.batches(3))
    assert same_batches(list(rank0.batches(3)), epoch3)
    assert mostly_other_crops(first_views_by_id(epoch3), first_views_by_id(rank0.batches(4)))


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_at_a_step_gives_the_rest_of_the_uninterrupted_epoch(kind, loader):
    rank1 = loader(kind, ViewCrop(ID_SIDE), rank_shard(1))
    full = list(rank1.batches(2))
    assert len(full) == len(rank1) == rank1.steps_per_epoch == 4
    for start in (1, 3):
        assert same_batches(list(rank1.batches(2, start_step=start)), full[start:])
    assert list(rank1.batches(2, start_step=len(rank1))) == []


@pytest.mark.parametrize("kind", KINDS_SLOW_FFCV)
def test_a_new_loader_with_the_seed_repeats_the_batches_another_seed_does_not(kind, request, loader):
    kept = list(loader(kind, ViewCrop(ID_SIDE), rank_shard(0)).batches(1))
    assert same_batches(list(build(kind, request, BATCH, ViewCrop(ID_SIDE), rank_shard(0)).batches(1)), kept)
    seed7 = Shard(0, 2, seed=7)
    other_seed = list(build(kind, request, BATCH, ViewCrop(ID_SIDE), seed7).batches(1))
    assert [read_ids(v1) for v1, _ in other_seed] == expected_ids(seed7, 1) != expected_ids(rank_shard(0), 1)
    assert mostly_other_crops(first_views_by_id(other_seed), first_views_by_id(kept))


@pytest.mark.parametrize("kind", KINDS)
def test_whole_image_unflipped_views_of_an_index_subset_are_the_images(kind, loader, id_images):
    """scale = ratio = 1 and flip_prob 0: every view is its image exactly; only the shard's indices are read, in
    DistributedSampler's order over them."""
    shard = Shard(seed=2, indices=range(8, 40))
    batches = list(loader(kind, WHOLE_UNFLIPPED, shard).batches(0))
    assert [read_ids(v1) for v1, _ in batches] == expected_ids(shard, 0)
    images = torch.from_numpy(id_images).permute(0, 3, 1, 2)
    for v1, v2 in batches:
        assert torch.equal(v1, images[read_ids(v1)]) and torch.equal(v2, images[read_ids(v1)])


@pytest.mark.parametrize("kind", KINDS)
def test_quarter_area_square_crops_flipped_when_flip_prob_is_one(kind, loader):
    """scale 0.25, ratio 1 on 16 px images: 8 x 8 crops, enlarged to 16 px, so each ramp spans 7 steps of 15
    instead of the image's 15 (the enlargement clamps at the crop's edge pixels), and mirrored: the green
    (column) ramp falls left to right, the blue (row) ramp still rises downwards."""
    v1, v2 = (torch.cat(views).int() for views in zip(*loader(kind, QUARTER_FLIPPED, rank_shard(0)).batches(0)))
    for view in (v1, v2):
        columns, rows = view[:, 1], view[:, 2]
        assert (columns[:, :, 0] - columns[:, :, -1] == 7 * 15).all()
        assert (rows[:, -1, :] - rows[:, 0, :] == 7 * 15).all()
        assert (columns.diff(dim=2) <= 0).all() and (rows.diff(dim=1) >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_too_few_images_for_one_batch_per_rank_is_an_error(kind, request):
    with pytest.raises(ValueError, match="cannot fill one batch of 64"):
        build(kind, request, 64, ViewCrop(ID_SIDE), Shard(world_size=2))
