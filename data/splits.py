"""Index splits, all seeded and returned sorted: the held-out test split (stratified), the validation-loss split
(a plain permutation, for unlabeled pools too) and the class-balanced label subsets of fine-tuning."""
from __future__ import annotations

import torch


def _labels(labels) -> torch.Tensor:
    return torch.as_tensor(labels).reshape(-1).to(device="cpu", dtype=torch.int64)


def stratified_split(labels, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), sorted, with round(val_fraction * n_c) of each class c in validation.

    A class with at least two samples keeps at least one on each side; a singleton stays in train.
    """
    labels = _labels(labels)
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_val = 0 if idx.numel() < 2 else min(max(round(val_fraction * idx.numel()), 1), idx.numel() - 1)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def split_indices(count: int, valid_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) index tensors: a seeded permutation, the first round(count * valid_fraction) held out."""
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_valid = int(round(count * valid_fraction))
    return perm[n_valid:].sort().values, perm[:n_valid].sort().values


def balanced_subset(labels, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices holding round(fraction * n_c) (at least 1) of every class c."""
    labels = _labels(labels)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).view(-1)
        take = max(1, round(fraction * idx.numel()))
        chosen.append(idx[torch.randperm(idx.numel(), generator=g)[:take]])
    return torch.cat(chosen).sort().values
