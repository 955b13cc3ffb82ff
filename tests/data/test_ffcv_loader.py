"""What only the FFCV loader does: its decoder threads (any number give the same batches; FFCV's reused buffers
never reach the views handed out; leaving an epoch stops its thread; torch's thread count is kept), FFCV's
quasi-random order, the reduced JPEG decode, the install hint. The behaviour all loaders share (views, shards,
seeding, resume, crop options) is tests/data/test_loaders.py, on the same .beton (id_beton, tests/data/conftest.py).

A test that builds a loader and reads from it pays the compilation of its FFCV pipeline (3-5 s): those are slow.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV is not installed (bash launch/install.sh --ffcv)")

from data.ffcv_loader import FFCVTwoViewLoader, beton_size
from data.views import Shard, ViewCrop
from tests.data.conftest import ID_COUNT, read_ids, same_batches


def take(loader, epoch=0, start_step=0, count=2):
    """The first `count` batches from start_step."""
    batches = loader.batches(epoch, start_step)
    out = [next(batches) for _ in range(count)]
    batches.close()
    return out


def test_beton_size_counts_the_stored_images(id_beton):
    assert beton_size(id_beton) == ID_COUNT


def test_order_must_be_random_or_quasi_random_and_quasi_random_single_rank():
    """Checked before any file is read."""
    with pytest.raises(ValueError, match="order='sequential': choose random or quasi_random"):
        FFCVTwoViewLoader("x.beton", 8, ViewCrop(6), order="sequential")
    with pytest.raises(ValueError, match="single-rank in FFCV 1.0.2: use order=random with several ranks"):
        FFCVTwoViewLoader("x.beton", 8, ViewCrop(6), Shard(rank=1, world_size=2), order="quasi_random")


def test_missing_ffcv_gives_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ffcv" else real(name, *a))
    with pytest.raises(ImportError, match="launch/install.sh --ffcv"):
        FFCVTwoViewLoader("x.beton", 4, ViewCrop(8))


@pytest.mark.slow  # two FFCV pipelines compiled, several epochs
def test_views_outlive_later_batches_and_epochs_and_any_thread_count_agrees(id_beton):
    """FFCV's buffers are reused across batches and (here) epochs; the views handed out are never overwritten,
    and an epoch left unfinished for another stops with an error instead of yielding another's pixels. A loader
    with two decoding threads gives the same batches, from the start of an epoch or resumed."""
    loader = FFCVTwoViewLoader(id_beton, 8, ViewCrop(6), Shard(seed=5), num_workers=1)
    two_threads = FFCVTwoViewLoader(id_beton, 8, ViewCrop(6), Shard(seed=5), num_workers=2)
    first = list(loader.batches(0))
    kept = [(a.clone(), b.clone()) for a, b in first]
    assert same_batches(list(loader.batches(1)), list(two_threads.batches(1))) and same_batches(first, kept)
    assert same_batches(list(two_threads.batches(0, start_step=3)), kept[3:])
    left = loader.batches(2)
    next(left)
    assert same_batches(list(loader.batches(3)), list(two_threads.batches(3)))
    with pytest.raises(RuntimeError, match="epoch 2 of .*ids.beton was left unfinished"):
        next(left)


@pytest.mark.slow  # compiles an FFCV pipeline
def test_quasi_random_order_reads_each_image_once(id_beton):
    loader = FFCVTwoViewLoader(id_beton, 8, ViewCrop(6), num_workers=1, order="quasi_random", os_cache=False)
    ids = sorted(i for view1, _ in loader.batches(0, start_step=1) for i in read_ids(view1))
    assert len(ids) == ID_COUNT - 8 and len(set(ids)) == ID_COUNT - 8


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


@pytest.mark.slow  # writes a .beton and compiles an FFCV pipeline
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


@pytest.mark.slow  # writes a .beton and compiles an FFCV pipeline
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


@pytest.mark.slow  # a fresh process imports FFCV and compiles its pipeline
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
    assert out.stdout.split() == [str(ID_COUNT), str(ID_COUNT // 8), "3"]


@pytest.mark.slow  # compiles an FFCV pipeline and waits for its queue to fill
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
