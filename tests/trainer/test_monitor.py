"""The checks run during and after pretraining (trainer.evaluation.monitor) on a tiny network and digits, against
features, votes and losses computed here by hand: eval-mode features of normalized images, scikit-learn's kNN."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from sklearn.neighbors import KNeighborsClassifier

from data.augment import IMAGENET_MEAN, IMAGENET_STD
from data.digits import load_digits_uint8
from data.splits import stratified_split
from trainer.evaluation import monitor
from trainer.evaluation.monitor import backbone_knn, probe_rows, validation_loss
from trainer.inputs import LabeledSplit
from trainer.loss import NTXentLoss

CPU = torch.device("cpu")


def tiny_backbone(seed: int, channels: int) -> nn.Module:
    """Conv -> BatchNorm -> ReLU -> 2x2 pool: BatchNorm's running statistics are set away from the batch's, so
    train-mode and eval-mode features differ."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten())
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.train()


@torch.no_grad()
def eval_features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    was_training = net.training
    out = net.eval()(TF.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD))
    net.train(was_training)
    return out


def sklearn_knn_top1(bank, bank_labels, queries, labels, k: int, temperature: float) -> float:
    """Centered cosine kNN, votes exp(similarity / T): cosine distance d = 1 - similarity."""
    mean = bank.mean(0, keepdims=True)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / temperature))
    predictions = knn.fit(bank - mean, bank_labels).predict(queries - mean)
    return float((predictions == labels).mean())


@pytest.fixture(scope="module")
def split() -> LabeledSplit:
    images, labels = load_digits_uint8(8)
    images, labels = images[:300], labels[:300]
    train, test = stratified_split(labels, 0.2, seed=0)
    return LabeledSplit(images[train], labels[train], images[test], labels[test])


def knn_on_hand_features(net, split, k=20, temperature=0.1) -> float:
    bank, queries = eval_features(net, split.train_images), eval_features(net, split.test_images)
    return sklearn_knn_top1(bank.double().numpy(), split.train_labels.numpy(), queries.double().numpy(),
                            split.test_labels.numpy(), k, temperature)


def test_backbone_knn_is_the_knn_of_eval_mode_features(split):
    net = tiny_backbone(0, 16)
    running_mean = net[1].running_mean.clone()
    result = backbone_knn(net, split, CPU, k=20, temperature=0.1)
    assert result["top1"] == pytest.approx(knn_on_hand_features(net, split), abs=1 / len(split.test_labels) + 1e-9)
    assert result["top1"] > 0.5  # chance is 0.1: the features carry the digits
    assert net.training and torch.equal(net[1].running_mean, running_mean)  # mode restored, statistics untouched


def test_probe_rows_score_the_learned_and_the_random_backbone_each(split, monkeypatch):
    """The linear probe (checked against scikit-learn in test_probe) is replaced by a recorder here: what matters is
    which features, labels and seed reach it, and that its top-1 lands in the right row."""
    fits = []

    def recording_probe(train_x, train_y, test_x, test_y, *, seed):
        fits.append((train_x, train_y, test_x, test_y, seed))
        return {"top1": len(fits) / 10}

    monkeypatch.setattr(monitor, "linear_probe", recording_probe)
    learned, random_init = tiny_backbone(0, 16), tiny_backbone(1, 2)
    rows = probe_rows(learned, random_init, split, CPU, k=20, temperature=0.1, seed=3)
    assert set(rows) == {"simclr", "random_init"} and len(fits) == 2
    for (name, net), fit, linear_top1 in zip((("simclr", learned), ("random_init", random_init)), fits, (0.1, 0.2)):
        train_x, train_y, test_x, test_y, seed = fit
        torch.testing.assert_close(train_x, eval_features(net, split.train_images), atol=1e-5, rtol=0)
        torch.testing.assert_close(test_x, eval_features(net, split.test_images), atol=1e-5, rtol=0)
        assert torch.equal(train_y, split.train_labels) and torch.equal(test_y, split.test_labels) and seed == 3
        assert rows[name]["linear_top1"] == linear_top1
        assert rows[name]["knn_top1"] == pytest.approx(knn_on_hand_features(net, split), abs=1 / 60 + 1e-9)
    assert rows["simclr"]["knn_top1"] > rows["random_init"]["knn_top1"]  # 64 features against 8: not swapped
    assert learned.training and random_init.training


class PairLoader:
    """The two-view loader's interface over fixed (view1, view2) uint8 batches."""

    def __init__(self, pairs):
        self.pairs = pairs

    def batches(self, epoch: int):
        yield from self.pairs


class NoisyNormalize:
    """An augmentation whose randomness is all in the generator it is handed; records that generator's seed."""

    def __init__(self):
        self.seeds = []

    def __call__(self, images, generator):
        self.seeds.append(generator.initial_seed())
        return TF.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD) + 0.3 * torch.randn(
            images.shape, generator=generator)


def test_validation_loss_averages_the_eval_mode_loss_over_batches_with_seeded_views():
    images, _ = load_digits_uint8(8)
    pairs = [(images[i:i + 16], images[i + 100:i + 116]) for i in (0, 16, 32)]
    model, augment, loss_fn = tiny_backbone(0, 8), NoisyNormalize(), NTXentLoss(temperature=0.5)
    running_var = model[1].running_var.clone()
    torch.manual_seed(123)
    loss, top1 = validation_loss(model, PairLoader(pairs), augment, loss_fn, CPU, None, seed=7, epoch=2)
    seeds = augment.seeds
    assert len(seeds) == 6 and seeds[0::2] == seeds[1::2] and len(set(seeds)) == 3  # one generator per batch
    expected = []
    with torch.no_grad():
        for (v1, v2), seed in zip(pairs, seeds[0::2]):
            g = torch.Generator().manual_seed(seed)
            views = torch.cat([NoisyNormalize()(v1, g), NoisyNormalize()(v2, g)])
            expected.append(torch.stack(loss_fn(*model.eval()(views).chunk(2), return_accuracy=True)))
    model.train()
    expected_loss, expected_top1 = torch.stack(expected).mean(0).tolist()
    assert loss == pytest.approx(expected_loss, rel=1e-5) and top1 == pytest.approx(expected_top1, abs=1e-6)
    assert model.training and torch.equal(model[1].running_var, running_var)

    torch.manual_seed(456)  # the global RNG plays no part: the same epoch gives the same loss and views
    again = NoisyNormalize()
    assert validation_loss(model, PairLoader(pairs), again, loss_fn, CPU, None, seed=7, epoch=2) == (loss, top1)
    assert again.seeds == seeds
    later = NoisyNormalize()
    validation_loss(model, PairLoader(pairs), later, loss_fn, CPU, None, seed=7, epoch=3)
    assert set(later.seeds).isdisjoint(seeds)  # another epoch, other views
