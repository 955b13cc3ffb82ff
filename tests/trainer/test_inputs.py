"""trainer.inputs on digits: pretraining never sees the held-out test images, the splits have the configured sizes,
the loaders and the labeled split hold the images they say, and the augmentation normalizes as evaluation does."""
import torch
import torchvision.transforms.v2.functional as TF

from data.augment import IMAGENET_MEAN, IMAGENET_STD
from data.digits import load_digits_uint8
from trainer.config_load import load_config
from trainer.distributed import DistContext
from trainer.inputs import build_augment, build_pretrain_data

CPU = DistContext(0, 0, 1, torch.device("cpu"), "gloo")


def digits_config(*overrides: str):
    return load_config(overrides=["dataset.name=digits", "dataset.loader=memory", "dataset.input_shape=(8,8,3)",
                                  "batch_size=64", "eval.test_fraction=0.25", "dataset.valid_size=0.1", *overrides])


def positions(images: torch.Tensor, all_images: torch.Tensor) -> list[int]:
    """Index of each image in the full digits tensor (no two digits images are identical)."""
    where = {bytes(img.numpy()): i for i, img in enumerate(all_images.flatten(1))}
    return [where[bytes(img.numpy())] for img in images.flatten(1)]


def test_pretraining_and_the_held_out_test_split_are_disjoint_and_sized_by_the_config():
    cfg = digits_config()
    all_images, all_labels = load_digits_uint8(8)
    data = build_pretrain_data(cfg, CPU)
    train, valid = set(data.train.indices.tolist()), set(data.valid.indices.tolist())
    test = set(positions(data.labeled.test_images, all_images))
    pool = positions(data.labeled.train_images, all_images)
    assert len(test) == len(data.labeled.test_images) and len(set(pool)) == len(pool)
    assert train.isdisjoint(test) and valid.isdisjoint(test) and train.isdisjoint(valid)
    assert train | valid == set(pool) and set(pool) | test == set(range(len(all_images)))
    # eval.test_fraction of every class is held out (rounded per class); dataset.valid_size of the rest
    class_sizes = torch.bincount(all_labels, minlength=10)
    held_out = torch.bincount(data.labeled.test_labels, minlength=10)
    assert ((held_out - 0.25 * class_sizes).abs() <= 0.5).all()
    assert len(valid) == round(0.1 * len(pool))
    # labels travel with their images
    assert torch.equal(data.labeled.test_labels, all_labels[positions(data.labeled.test_images, all_images)])
    assert torch.equal(data.labeled.train_labels, all_labels[pool])


def test_the_split_follows_the_seed_and_the_loaders_serve_only_their_images():
    first, again = build_pretrain_data(digits_config(), CPU), build_pretrain_data(digits_config(), CPU)
    other = build_pretrain_data(digits_config("seed=1"), CPU)
    assert torch.equal(first.train.indices, again.train.indices)
    assert not torch.equal(first.train.indices, other.train.indices)
    assert not torch.equal(first.labeled.test_labels, other.labeled.test_labels)
    steps = first.train.steps_per_epoch
    assert steps == len(first.train.indices) // 64  # full batches only
    view1, view2 = next(iter(first.train.batches(0)))
    assert view1.shape == view2.shape == (64, 3, 8, 8) and view1.dtype == torch.uint8
    no_valid = build_pretrain_data(digits_config("dataset.valid_size=0.0"), CPU)
    assert no_valid.valid is None and len(no_valid.train.indices) == len(no_valid.labeled.train_images)


def test_augmentation_follows_the_config_and_ends_with_the_imagenet_normalization():
    images, _ = load_digits_uint8(8)
    plain = build_augment(digits_config("dataset.jitter_prob=0.0", "dataset.grayscale_prob=0.0"))
    expected = TF.normalize(images[:32].float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(plain(images[:32], torch.Generator().manual_seed(0)), expected, atol=1e-6, rtol=0)
    jittered = build_augment(digits_config("dataset.s=0.5", "dataset.blur_prob=0.5"))
    assert (jittered.strength, jittered.blur_prob, jittered.jitter_prob) == (0.5, 0.5, 0.8)
