"""Preparing .beton files from the real on-disk formats (ImageFolder JPEGs, CIFAR pickles, STL10 binaries)."""
import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from data.prepare import ImageEncoding, prepare
from data.prepare import main as prepare_main
from data.sources import open_source

ffcv = pytest.importorskip("ffcv", reason="FFCV is not installed (bash launch/install.sh --ffcv)")


def photo_crops(count, size=48):
    """`count` distinct size x size crops of scikit-learn's two sample photographs."""
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    return [photos[i % 2][20 + 23 * i:20 + 23 * i + size, 30 + 29 * i:30 + 29 * i + size] for i in range(count)]


def read_beton(path, images=True):
    """(images [N, H, W, 3] or None, labels) in stored order; images need one resolution."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()] if images else None, "label": [IntDecoder()]})
    batches = [[np.array(x) for x in batch] for batch in loader]
    labels = [int(v) for batch in batches for v in batch[-1].reshape(-1)]
    return (np.concatenate([b[0] for b in batches]) if images else None), labels


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    crops = photo_crops(6)
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(crops[label * 3 + i]).save(root / cls / f"{i}.jpg", quality=90)
    return root


def test_imagefolder_round_trip(image_folder, tmp_path):
    result = prepare("imagefolder", tmp_path / "f.beton", str(image_folder), num_workers=1)
    assert result["written"] == 6 and result["skipped"] == []
    images, labels = read_beton(tmp_path / "f.beton")
    assert labels == [0, 0, 0, 1, 1, 1] and images.shape == (6, 48, 48, 3)
    original = np.asarray(Image.open(image_folder / "dog" / "2.jpg").convert("RGB")).astype(float)
    assert np.abs(images[5] - original).mean() < 8  # re-encoded at quality 90
    assert not list(tmp_path.glob(".f.beton.tmp*"))


@pytest.mark.parametrize("name,folder,files,label_key", [
    ("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"),
    ("cifar100", "cifar-100-python", ["train"], "fine_labels")])
def test_cifar_format_round_trip(tmp_path, name, folder, files, label_key):
    (tmp_path / folder).mkdir()
    images = np.stack(photo_crops(2 * len(files), 32))  # N, 32, 32, 3; CIFAR stores rows of CHW
    labels = [(7 * i + 3) % 10 for i in range(len(images))]
    for k, file in enumerate(files):
        part = slice(2 * k, 2 * k + 2)
        with open(tmp_path / folder / file, "wb") as f:
            pickle.dump({"data": images[part].transpose(0, 3, 1, 2).reshape(2, -1), label_key: labels[part]}, f)
    prepare(name, tmp_path / "c.beton", str(tmp_path), encoding=ImageEncoding("raw"), num_workers=1)
    stored, stored_labels = read_beton(tmp_path / "c.beton")
    assert stored_labels == labels and np.array_equal(stored, images)


def test_stl10_format_round_trip(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = np.stack(photo_crops(6, 96))  # N, 96, 96, 3 -> STL10 stores column-major CHW
    (folder / "train_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())
    (folder / "train_y.bin").write_bytes(np.array([1, 2, 3, 10, 1, 2], dtype=np.uint8).tobytes())  # 1-based
    (folder / "unlabeled_X.bin").write_bytes(images[:4].transpose(0, 3, 2, 1).tobytes())
    assert len(open_source("stl10", tmp_path, "unlabeled")) == 4
    prepare("stl10", tmp_path / "s.beton", str(tmp_path), split="train+unlabeled", encoding=ImageEncoding("raw"),
            num_workers=1)
    stored, labels = read_beton(tmp_path / "s.beton")
    assert labels == [0, 1, 2, 9, 0, 1, -1, -1, -1, -1]
    assert np.array_equal(stored, np.concatenate([images, images[:4]]))


def test_corrupt_jpeg_fails_naming_the_file_unless_skipped(image_folder, tmp_path, capsys):
    bad = image_folder / "dog" / "broken.jpg"
    bad.write_bytes((image_folder / "dog" / "0.jpg").read_bytes()[:200])
    with pytest.raises(ValueError, match="broken.jpg"):
        prepare("imagefolder", tmp_path / "x.beton", str(image_folder), num_workers=1)
    assert not (tmp_path / "x.beton").exists() and not list(tmp_path.glob(".x.beton.tmp*"))
    code = prepare_main(["--dataset", "imagefolder", "--data-dir", str(image_folder), "--out",
                         str(tmp_path / "x.beton"), "--skip-bad", "--num-workers", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and "broken.jpg" in err
    assert read_beton(tmp_path / "x.beton", images=False)[1] == [0, 0, 0, 1, 1, 1]


def test_missing_or_empty_inputs_are_named(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o.beton")]
    assert prepare_main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")] + out) == 2
    assert "none" in capsys.readouterr().err
    (tmp_path / "empty" / "stl10_binary").mkdir(parents=True)
    assert prepare_main(["--dataset", "stl10", "--data-dir", str(tmp_path / "empty")] + out) == 2
    assert "train_X.bin" in capsys.readouterr().err
    assert prepare_main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "empty")] + out) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "empty" / "stl10_binary" / "train_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a whole number"):
        open_source("stl10", tmp_path / "empty")


def test_datasets_paths_are_under_simclr_data_and_data_dir_defaults_there(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIMCLR_DATA", str(tmp_path))  # image_folder is tmp_path/folder
    monkeypatch.chdir(tmp_path / "folder")  # a working directory without datasets/: the paths cannot mean it
    assert prepare_main(["--dataset", "imagefolder", "--data-dir", "datasets/folder", "--out", "datasets/b/f.beton",
                         "--num-workers", "1"]) == 0
    assert f"wrote 6 images to {tmp_path / 'b' / 'f.beton'}" in capsys.readouterr().out
    assert read_beton(tmp_path / "b" / "f.beton", images=False)[1] == [0, 0, 0, 1, 1, 1]
    assert prepare_main(["--dataset", "cifar10", "--out", "datasets/c.beton"]) == 2  # no --data-dir: datasets/cifar10
    assert f"{tmp_path / 'cifar10'}: no such directory" in capsys.readouterr().err


def test_ctrl_c_mid_write_leaves_no_file_and_the_earlier_one_whole(image_folder, tmp_path, capsys, monkeypatch):
    import data.prepare as prepare_module

    out = tmp_path / "x.beton"
    out.write_bytes(b"an earlier file")

    def half_written(source, indices, path, fields, num_workers):
        path.write_bytes(b"half a .beton")
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_write", half_written)
    code = prepare_main(["--dataset", "imagefolder", "--data-dir", str(image_folder), "--out", str(out)])
    assert code == 130 and f"interrupted: {out} not written" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier file" and not list(tmp_path.glob(".x.beton.tmp*"))
