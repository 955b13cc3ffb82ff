"""FFCV two-view loader: shapes, independent views, seeded crops (runs, thread counts, resume), rank shards."""
import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV is not installed (bash launch/install.sh --ffcv)")

from data.ffcv_loader import FFCVTwoViewLoader, beton_size
from data.views import Shard, ViewCrop


@pytest.fixture(scope="module")
def id_beton(tmp_path_factory):
    """64 raw 12x10 images, image i filled with the value 3*i: any crop of it still says which it is."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    samples = [(np.full((12, 10, 3), 3 * i, dtype=np.uint8), i % 4) for i in range(64)]
    path = tmp_path_factory.mktemp("beton") / "ids.beton"
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(samples)
    return str(path)


@pytest.fixture(scope="module")
def digits_beton(tmp_path_factory):
    from data.prepare import prepare

    path = tmp_path_factory.mktemp("beton") / "digits.beton"
    prepare("digits", path, num_workers=1)
    return str(path)


@pytest.fixture(scope="module")
def digits_loader(digits_beton):
    return FFCVTwoViewLoader(digits_beton, 32, ViewCrop(16), Shard(seed=3), num_workers=1)


def take(loader, epoch=0, start_step=0, count=2):
    """The first `count` batches from start_step."""
    batches = loader.batches(epoch, start_step)
    out = [next(batches) for _ in range(count)]
    batches.close()
    return out


def same(batches, others):
    return len(batches) == len(others) and all(torch.equal(a1, b1) and torch.equal(a2, b2)
                                               for (a1, a2), (b1, b2) in zip(batches, others))


@pytest.mark.slow  # several FFCV epochs
def test_views_outlive_later_batches_and_epochs(id_beton):
    """FFCV's buffers are reused across batches and (here) epochs; the views handed out are never overwritten,
    and an epoch left unfinished for another stops with an error instead of yielding another's pixels."""
    loader, fresh = (FFCVTwoViewLoader(id_beton, 8, ViewCrop(6), Shard(seed=5), num_workers=1) for _ in range(2))
    first = list(loader.batches(0))
    kept = [(a.clone(), b.clone()) for a, b in first]
    assert same(list(loader.batches(1)), list(fresh.batches(1))) and same(first, kept)
    left = loader.batches(2)
    next(left)
    assert same(list(loader.batches(3)), list(fresh.batches(3)))
    with pytest.raises(RuntimeError, match="epoch 2 of .*ids.beton was left unfinished"):
        next(left)


def test_views_have_the_shape_and_differ(digits_loader, digits_beton):
    assert beton_size(digits_beton) == 1797 and digits_loader.steps_per_epoch == 1797 // 32
    v1, v2 = take(digits_loader, count=1)[0]
    assert v1.shape == v2.shape == (32, 3, 16, 16) and v1.dtype == v2.dtype == torch.uint8
    assert (v1 != v2).float().mean() > 0.3  # independent crops of the same images


@pytest.mark.slow  # several FFCV epochs
def test_seed_fixes_batches_across_runs_and_thread_counts(digits_loader, digits_beton):
    again = FFCVTwoViewLoader(digits_beton, 32, ViewCrop(16), Shard(seed=3), num_workers=2)
    for (a1, a2), (b1, b2) in zip(take(digits_loader), take(again)):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(take(digits_loader, epoch=1, count=1)[0][0], take(digits_loader, count=1)[0][0])


def test_resume_from_a_step_gives_the_same_batches(digits_loader):
    full = take(digits_loader, epoch=2, count=3)
    resumed = take(digits_loader, epoch=2, start_step=2, count=1)[0]
    assert torch.equal(full[2][0], resumed[0]) and torch.equal(full[2][1], resumed[1])


def test_indices_subset_and_too_small(id_beton):
    loader = FFCVTwoViewLoader(id_beton, 4, ViewCrop(6, scale=(0.5, 1.0)), Shard(indices=range(8, 16)), num_workers=1)
    seen = sorted(int(v[0, 0, 0]) // 3 for view1, _ in loader.batches(0) for v in view1)
    assert loader.steps_per_epoch == 2 and seen == list(range(8, 16))
    with pytest.raises(ValueError, match="lower batch_size"):
        FFCVTwoViewLoader(id_beton, 64, ViewCrop(6), Shard(world_size=2), num_workers=1)


def _shard(rank, world_size, beton):
    loader = FFCVTwoViewLoader(beton, 8, ViewCrop(6), Shard(rank, world_size, seed=1), num_workers=1)
    assert loader.steps_per_epoch == 4
    return [[sorted(int(v[0, 0, 0]) // 3 for v in view1) for view1, _ in loader.batches(epoch)] for epoch in (0, 1)]


def test_two_ranks_get_disjoint_shards_covering_the_set(distributed_run, id_beton):
    shards = distributed_run(_shard, 2, id_beton)
    for epoch in (0, 1):
        ids = [sum(shards[rank][epoch], []) for rank in (0, 1)]
        assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(64))
    assert shards[0][0] != shards[0][1]  # reshuffled per epoch


def test_missing_ffcv_gives_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ffcv" else real(name, *a))
    with pytest.raises(ImportError, match="launch/install.sh --ffcv"):
        FFCVTwoViewLoader("x.beton", 4, ViewCrop(8))


def test_quasi_random_order_single_rank(id_beton):
    loader = FFCVTwoViewLoader(id_beton, 8, ViewCrop(6), num_workers=1, order="quasi_random", os_cache=False)
    ids = sorted(int(v[0, 0, 0]) // 3 for view1, _ in loader.batches(0, start_step=1) for v in view1)
    assert len(ids) == 56 and len(set(ids)) == 56
    with pytest.raises(ValueError, match="single-rank"):
        FFCVTwoViewLoader(id_beton, 8, ViewCrop(6), Shard(rank=1, world_size=2), order="quasi_random")


@pytest.mark.parametrize("flip_prob,flipped", [(0.0, False), (1.0, True)])
def test_flip_prob(tmp_path, flip_prob, flipped):
    """Identical left-to-right ramps, full-image crops: only a flip can change a view."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    ramp = np.broadcast_to((np.arange(8, dtype=np.uint8) * 30)[None, :, None], (8, 8, 3)).copy()
    path = str(tmp_path / "ramps.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset([(ramp, 0)] * 32)
    loader = FFCVTwoViewLoader(path, 16, ViewCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=flip_prob),
                               num_workers=1)
    expected = torch.from_numpy(ramp).permute(2, 0, 1)
    expected = expected.flip(-1) if flipped else expected
    for view in take(loader, count=1)[0]:
        assert torch.equal(view, expected.expand_as(view))


def test_jpeg_reduction_only_where_every_crop_stays_at_least_the_output_side():
    from data.ffcv_decoder import _jpeg_reduction

    def boxes(*sides):
        return np.array([[0, 0, h, w, 0] for h, w in sides], dtype=np.int64)

    assert _jpeg_reduction(boxes((100, 100), (100, 100)), 96) == 1
    assert _jpeg_reduction(boxes((192, 300), (250, 200)), 96) == 2
    assert _jpeg_reduction(boxes((400, 400), (191, 400)), 96) == 1  # one view would be upscaled
    assert _jpeg_reduction(boxes((384, 400), (390, 500)), 96) == 4
    assert _jpeg_reduction(boxes((5000, 5000), (5000, 5000)), 32) == 8


def test_crop_coordinates_map_to_the_reduced_image():
    from data.ffcv_decoder import _scaled

    assert [_scaled(c, 4, 64) for c in (0, 1, 2, 100, 102, 255)] == [0, 0, 1, 25, 26, 64]
    assert _scaled(256, 8, 32) == 32 and _scaled(257, 8, 32) == 32  # clamped to the decoded size


def test_reduced_jpeg_decode_matches_a_full_decode_and_area_resize(tmp_path):
    """Whole-image views of a 256x256 photograph at 32 px: FFCV decodes the JPEG at 1/8 scale; the views must
    equal PIL's full decode + area resize (OpenCV INTER_AREA) within JPEG / filter differences."""
    import cv2
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")[100:356, 150:406].copy()
    path = str(tmp_path / "photo.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()},
                  num_workers=1).from_indexed_dataset([(photo, 0)] * 16)
    loader = FFCVTwoViewLoader(path, 8, ViewCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0), num_workers=1)
    reference = torch.from_numpy(cv2.resize(photo, (32, 32), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)
    for view in take(loader, count=1)[0]:
        difference = (view.float() - reference.float()).abs()
        assert difference.mean() < 3 and difference.max() < 40, (difference.mean(), difference.max())


def test_reduced_decode_keeps_random_crops_where_they_were(tmp_path):
    """A 256x256 JPEG whose red channel is the column and green the row; 128x128 crops at random places, 32 px
    views (decoded at 1/4): each view must span the crop's 128 columns and rows (pixel centers 2 .. 126 of
    them) at a position inside the image, exactly as a full-resolution crop would."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    ramp = np.arange(256, dtype=np.uint8)
    image = np.stack([np.broadcast_to(ramp[None, :], (256, 256)), np.broadcast_to(ramp[:, None], (256, 256)),
                      np.zeros((256, 256), np.uint8)], axis=-1).copy()
    path = str(tmp_path / "coords.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=100), "label": IntField()},
                  num_workers=1).from_indexed_dataset([(image, 0)] * 16)
    loader = FFCVTwoViewLoader(path, 16, ViewCrop(32, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_prob=0.0),
                               num_workers=2)
    lefts = set()
    for view in take(loader, count=1)[0]:
        columns, rows = view[:, 0].float().mean(1), view[:, 1].float().mean(2)  # [n, 32] each
        for along in (columns, rows):
            span = along[:, -1] - along[:, 0]
            assert ((span - 124).abs() <= 4).all(), span
            assert (along[:, 0] >= 0).all() and (along[:, -1] <= 255).all()
        lefts.update(int(v) // 8 for v in columns[:, 0])
    assert len(lefts) > 3  # the crops really are at different places


@pytest.mark.slow  # several FFCV epochs
def test_loader_keeps_the_callers_torch_thread_count(id_beton):
    """FFCV sets torch's thread count when imported (to 1) and at each epoch; a fresh process shows both."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; torch.set_num_threads(3)\n"
            "from data.ffcv_loader import FFCVTwoViewLoader, beton_size\nfrom data.views import ViewCrop\n"
            f"n = beton_size({id_beton!r}); loader = FFCVTwoViewLoader({id_beton!r}, 8, ViewCrop(6), num_workers=2)\n"
            "batches = len(list(loader.batches(0)))\n"
            "print(n, batches, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["64", "8", "3"]


def test_leaving_an_epoch_whose_batches_are_all_decoded_stops_its_thread_promptly(id_beton):
    """With the last batches_ahead (3) batches ready and unread, FFCV's thread waits, without a timeout, to queue
    its end-of-epoch marker: leaving the epoch must still end it, and at once."""
    import time

    loader = FFCVTwoViewLoader(id_beton, 8, ViewCrop(6), Shard(seed=5), num_workers=1)
    batches = loader.batches(0)
    for _ in range(loader.steps_per_epoch - 3):
        next(batches)
    thread = loader._epoch
    time.sleep(1.5)  # the thread decodes the rest and blocks on the full queue
    assert thread.output_queue.full()
    start = time.monotonic()
    batches.close()
    assert not thread.is_alive() and time.monotonic() - start < 5
    assert len(list(loader.batches(1))) == loader.steps_per_epoch  # and the next epoch runs normally
