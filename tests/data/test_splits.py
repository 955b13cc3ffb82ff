"""Index splits: the held-out test split (stratified), the validation-loss split and the fine-tuning label subsets
hold the counts they promise, never share an index, cover the data and depend only on their seed."""
import torch

from data.splits import balanced_subset, split_indices, stratified_split

# 10 + 5 + 1 + 2 samples of four classes, interleaved so that class blocks are not contiguous index ranges
LABELS = torch.tensor([0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 0, 1, 0])


def test_stratified_split_counts_per_class_and_keeps_both_sides_populated():
    train, val = stratified_split(LABELS, 0.3, seed=0)
    # class 0: round(3.0) = 3; class 1: round(1.5) = 2; class 2 is a singleton: stays in train;
    # class 3: round(0.6) = 1, which also leaves one of its two in train
    assert torch.bincount(LABELS[val], minlength=4).tolist() == [3, 2, 0, 1]
    assert torch.bincount(LABELS[train], minlength=4).tolist() == [7, 3, 1, 1]
    assert sorted(train.tolist() + val.tolist()) == list(range(len(LABELS)))  # disjoint and complete
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    _, all_but_one = stratified_split(LABELS, 0.99, seed=0)
    assert torch.bincount(LABELS[all_but_one], minlength=4).tolist() == [9, 4, 0, 1]  # one of each class left


def test_stratified_split_depends_on_the_seed_only():
    labels = torch.arange(200) % 4
    first = stratified_split(labels, 0.25, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, stratified_split(labels.numpy(), 0.25, seed=3)))
    assert not torch.equal(first[1], stratified_split(labels, 0.25, seed=4)[1])


def test_split_indices_holds_out_a_seeded_share():
    train, valid = split_indices(50, 0.1, seed=0)
    assert len(valid) == 5 and sorted(train.tolist() + valid.tolist()) == list(range(50))
    assert torch.equal(valid, valid.sort().values) and torch.equal(train, train.sort().values)
    assert torch.equal(valid, split_indices(50, 0.1, seed=0)[1])
    assert not torch.equal(valid, split_indices(50, 0.1, seed=1)[1])
    train, valid = split_indices(7, 0.0, seed=0)
    assert valid.numel() == 0 and train.tolist() == list(range(7))


def test_balanced_subset():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 3)
    subset = balanced_subset(labels, 0.1, seed=0)
    counts = torch.bincount(labels[subset], minlength=3).tolist()
    assert counts == [10, 5, 1] and len(set(subset.tolist())) == len(subset)  # at least one of the rare class
    assert torch.equal(subset, subset.sort().values) and torch.equal(subset, balanced_subset(labels, 0.1, seed=0))
    assert balanced_subset(labels, 1.0, seed=5).tolist() == list(range(len(labels)))
