"""Preparing .beton files from the real on-disk formats (ImageFolder JPEGs, CIFAR pickles, STL10 binaries)."""
import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from data.prepare import main as prepare_main
from data.prepare import prepare

ffcv = pytest.importorskip("ffcv", reason="FFCV is not installed (bash launch/install.sh --ffcv)")


def photo_crops(count, size=48):
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        img = load_sample_image(name)
        crops += [img[20 + 37 * i:20 + 37 * i + size, 30 + 41 * i:30 + 41 * i + size] for i in range(count // 2)]
    return crops


def read_labels(path, count):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=count, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": None, "label": [IntDecoder()]})
    return [int(v) for batch in loader for v in np.asarray(batch[0]).reshape(-1)]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i, crop in enumerate(photo_crops(6)[label * 3:label * 3 + 3]):
            Image.fromarray(crop).save(root / cls / f"{i}.jpg", quality=90)
    return root


def test_imagefolder_round_trip(image_folder, tmp_path):
    result = prepare("imagefolder", tmp_path / "f.beton", str(image_folder), num_workers=1)
    assert result["written"] == 6 and result["skipped"] == []
    assert read_labels(tmp_path / "f.beton", 6) == [0, 0, 0, 1, 1, 1]


def test_cifar_format_round_trip(tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = np.stack(photo_crops(8, 32))  # N, 32, 32, 3
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    labels = [3, 1, 4, 1, 5, 9, 2, 6]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        part = slice(0, 8) if name == "data_batch_1" else slice(0, 0)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows[part], "labels": labels[part]}, f)  # as python2 strings load
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    from torchvision.datasets import CIFAR10, cifar
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)  # no md5-matching files here
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    result = prepare("cifar10", tmp_path / "c.beton", str(root), num_workers=1)
    assert result["written"] == 8
    assert read_labels(tmp_path / "c.beton", 8) == labels


def test_stl10_format_round_trip(tmp_path, monkeypatch):
    folder = tmp_path / "stl" / "stl10_binary"
    folder.mkdir(parents=True)
    images = np.stack(photo_crops(6, 96))  # N, 96, 96, 3 -> STL10 stores column-major CHW
    (folder / "train_X.bin").write_bytes(images.transpose(0, 3, 2, 1).astype(np.uint8).tobytes())
    (folder / "train_y.bin").write_bytes(np.array([1, 2, 3, 10, 1, 2], dtype=np.uint8).tobytes())  # 1-based
    (folder / "unlabeled_X.bin").write_bytes(images[:4].transpose(0, 3, 2, 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    from torchvision.datasets import STL10
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)
    result = prepare("stl10", tmp_path / "s.beton", str(tmp_path / "stl"), split="train+unlabeled", num_workers=1)
    assert result["written"] == 10
    assert read_labels(tmp_path / "s.beton", 10) == [0, 1, 2, 9, 0, 1, -1, -1, -1, -1]


def test_corrupt_jpeg_fails_naming_the_file_unless_skipped(image_folder, tmp_path, capsys):
    bad = image_folder / "dog" / "broken.jpg"
    bad.write_bytes((image_folder / "dog" / "0.jpg").read_bytes()[:200])
    with pytest.raises(ValueError, match="broken.jpg"):
        prepare("imagefolder", tmp_path / "x.beton", str(image_folder), num_workers=1)
    assert not (tmp_path / "x.beton").exists() and not list(tmp_path.glob(".x.beton.tmp*"))
    code = prepare_main(["--dataset", "imagefolder", "--data-dir", str(image_folder), "--out",
                         str(tmp_path / "x.beton"), "--skip-bad", "--num-workers", "1"])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image" in captured.err and "broken.jpg" in captured.err
    assert read_labels(tmp_path / "x.beton", 6) == [0, 0, 0, 1, 1, 1]


def test_missing_inputs_are_named(tmp_path, capsys):
    assert prepare_main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out",
                         str(tmp_path / "o.beton")]) == 2
    assert "none" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert prepare_main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "empty"), "--out",
                         str(tmp_path / "o.beton")]) == 2
