"""Feature extraction: 2 gloo ranks give one process's features, in dataset order, each sample once."""
import torch
import torch.nn as nn

from trainer.evaluation.features import extract_features, shard_bounds


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))


def images():
    return torch.arange(11 * 12, dtype=torch.float32).view(11, 3, 2, 2) / 100


class Labeled(torch.utils.data.Dataset):
    def __len__(self):
        return 11

    def __getitem__(self, i):
        return images()[i], i % 3


def test_shards_cover_once():
    for count, world in [(11, 2), (3, 4), (8, 8), (0, 2)]:
        covered = [i for r in range(world) for i in range(*shard_bounds(count, r, world))]
        assert covered == list(range(count))


def _rank_features(rank, world_size):
    feats, _ = extract_features(model(), images(), batch_size=4)
    ds_feats, labels = extract_features(model(), Labeled(), batch_size=3)
    return feats, ds_feats, labels


def test_two_ranks_equal_one_process_in_order(distributed_run):
    expected, _ = extract_features(model(), images(), batch_size=5)
    direct = model().eval()(images())  # an independent computation: the whole set at once
    torch.testing.assert_close(expected, direct.detach())
    for feats, ds_feats, labels in distributed_run(_rank_features, 2):
        assert feats.shape == (11, 5)
        torch.testing.assert_close(feats, expected)
        torch.testing.assert_close(ds_feats, expected)
        assert labels.tolist() == [i % 3 for i in range(11)]


def test_model_mode_restored():
    m = model().train()
    extract_features(m, images(), batch_size=4)
    assert m.training
