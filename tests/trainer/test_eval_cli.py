"""The evaluation and fine-tuning commands on digits: an exported backbone evaluates, fine-tuning learns."""
import json

import numpy as np
import pytest
import torch

from data.splits import balanced_subset, stratified_split
from trainer import checkpoint
from trainer.config import ModelConfig
from trainer.evaluation.evaluate import main as eval_main
from trainer.evaluation.finetune import FinetuneOptions, finetune
from trainer.export import export_backbone
from trainer.model import build_backbone, build_model


@pytest.mark.slow  # trains and evaluates a model
def test_exported_backbone_evaluates_into_the_seed_table(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(small_stem=True, out_dim=16))
    checkpoint.save({"model": model.state_dict(), "step": 1}, tmp_path / "run", 1, keep=1)
    export_backbone(str(tmp_path / "run"), str(tmp_path / "backbone.pt"))
    out = tmp_path / "eval"
    code = eval_main(["--checkpoint", str(tmp_path / "backbone.pt"), "--dataset", "digits", "--image-size", "16",
                      "--small-stem", "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    extractors = [(r["classifier"], r["extractor"]) for r in result["rows"]]
    for name in ("PCA Features", "Raw pixels", "Random init", "SimCLR"):
        assert ("Logistic Regression", name) in extractors and ("KNN", name) in extractors
    accuracy = {row["extractor"]: row for row in result["rows"] if row["classifier"] == "KNN"}
    assert accuracy["PCA Features"]["top1"] > 0.9  # raw digits are easy for kNN: the baseline really ran
    linear = {row["extractor"]: row for row in result["rows"] if row["classifier"] == "Logistic Regression"}
    assert linear["PCA Features"]["top1"] > 0.95  # the components as they come; whitened they gave 93%
    assert "| Linear Classifier | Feature Extractor |" in (out / "eval.md").read_text()


def test_missing_checkpoint_is_named(capsys):
    assert eval_main(["--checkpoint", "no/such/run"]) == 2
    assert "no/such/run" in capsys.readouterr().err


@pytest.mark.slow  # trains and evaluates a model
def test_finetune_learns_digits_from_ten_percent_of_labels():
    from data.digits import load_digits_uint8

    images, labels = load_digits_uint8(16)
    subset = balanced_subset(labels[:1200], 0.1, seed=0)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", small_stem=True)
    options = FinetuneOptions(epochs=15, lr=0.05, batch_size=32)
    result = finetune(backbone, (images[subset], labels[subset]), (images[1200:], labels[1200:]), options,
                      device=torch.device("cpu"), seed=0)
    assert result["train_images"] == len(subset) and result["top1"] > 0.25  # chance is 0.1


def test_imagefolder_protocol_center_crops_the_border_away(tmp_path):
    """ImageNet's protocol: shorter side to S / 0.875, central S x S; a 2-px frame is cut off, while the
    fixed-size sets (crop fraction 1) keep their whole short side."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from trainer.evaluation.evaluate import labeled_splits

    framed = np.full((48, 64, 3), 255, dtype=np.uint8)
    framed[:2], framed[-2:], framed[:, :2], framed[:, -2:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(framed).save(tmp_path / split / "a" / "0.png")
    (train, _), _ = labeled_splits("imagefolder", str(tmp_path), 32, seed=0)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 0
    assert image[1:].min() > 200  # no red frame left: green and blue stay white everywhere
    from trainer.evaluation.evaluate import _Resized
    whole, _ = _Resized(ImageFolder(str(tmp_path / "train")), 32)[0]
    assert whole[1, 0].float().mean() < 200  # without the margin the top rows keep the frame


def test_validation_split_is_carved_from_the_training_part_only():
    """--split validation: a stratified 20% of the training part stands in for the test split, which is left
    out entirely (choosing a recipe there cannot see a test image, labeled or not)."""
    from data.digits import load_digits_uint8
    from trainer.evaluation.evaluate import labeled_splits

    images, labels = load_digits_uint8(8)
    train_idx, test_idx = stratified_split(labels, 0.3, seed=5)
    (tr_x, tr_y), (va_x, va_y) = labeled_splits("digits", None, 8, seed=5, split="validation")
    (full_x, _), (test_x, _) = labeled_splits("digits", None, 8, seed=5, split="test")
    assert len(tr_x) + len(va_x) == len(train_idx) == len(full_x)

    def rows(x):  # images as hashable rows: the digits have no exact duplicates across these sets
        return {bytes(r.numpy()) for r in x.flatten(1)}

    assert rows(tr_x).isdisjoint(rows(va_x))
    assert (rows(tr_x) | rows(va_x)) == rows(full_x) and rows(full_x).isdisjoint(rows(test_x))
    per_class = torch.bincount(va_y, minlength=10).float() / torch.bincount(labels[train_idx], minlength=10)
    assert torch.all((per_class - 0.2).abs() < 0.01)  # stratified: 20% of every class
    with pytest.raises(ValueError, match="only digits"):
        labeled_splits("stl10", "/nonexistent", 96, seed=0, split="validation")


@pytest.mark.slow  # trains and evaluates a model
def test_validation_evaluation_writes_its_own_files(tmp_path):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet8", small_stem=True)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    out = tmp_path / "eval"
    code = eval_main(["--checkpoint", str(tmp_path / "backbone.pt"), "--dataset", "digits", "--image-size", "16",
                      "--base-model", "resnet8", "--small-stem", "--device", "cpu", "--out", str(out),
                      "--split", "validation"])
    assert code == 0 and not (out / "eval.json").exists()  # the test table is never overwritten by a look
    result = json.loads((out / "eval_validation.json").read_text())
    assert result["split"] == "validation"
    arch = {row["architecture"] for row in result["rows"] if row["extractor"] == "SimCLR"}
    assert arch == {"ResNet-8 (32-64-128)"}
    assert "validation part of the training split" in (out / "eval_validation.md").read_text()


def test_data_dir_under_datasets_reads_from_simclr_data(tmp_path, monkeypatch):
    """--data-dir datasets/<name> is the folder under $SIMCLR_DATA (the rule of dataset.path too)."""
    from PIL import Image

    from trainer.evaluation.evaluate import labeled_splits

    for split, label in (("train", "a"), ("val", "b")):
        (tmp_path / "inet" / split / label).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "inet" / split / label / "0.png")
    monkeypatch.setenv("SIMCLR_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path / "inet")  # no ./datasets here: only the root can supply it
    (train, _), (test, _) = labeled_splits("imagefolder", "datasets/inet", 8, seed=0)
    assert len(train) == len(test) == 1
    monkeypatch.delenv("SIMCLR_DATA")
    with pytest.raises(FileNotFoundError, match="datasets/inet"):
        labeled_splits("imagefolder", "datasets/inet", 8, seed=0)
