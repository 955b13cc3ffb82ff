"""Evaluation during and after pretraining: validation contrastive loss, kNN monitor, final probe vs random init."""
from __future__ import annotations

import torch
import torch.nn as nn

from data.augment import normalize
from data.seeding import position_seed
from trainer import distributed
from trainer.evaluation.features import extract_features
from trainer.evaluation.probe import KNNOptions, knn_classify, linear_probe
from trainer.inputs import LabeledSplit


@torch.no_grad()
def validation_loss(model: nn.Module, loader, augment, loss_fn, device, amp_dtype, seed: int, epoch: int
                    ) -> tuple[float, float]:
    """Mean NT-Xent loss and contrastive top-1 over the held-out split (eval mode, as the seed), all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device)
    steps = 0
    g = torch.Generator(device=device)
    for step, (v1, v2) in enumerate(loader.batches(epoch)):
        g.manual_seed(position_seed(seed, distributed.rank(), epoch, step, 1))
        x = torch.cat([augment(v1.to(device), generator=g), augment(v2.to(device), generator=g)])
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            z = model(x)
        loss, top1 = loss_fn(*z.float().chunk(2), return_accuracy=True)
        total += torch.stack([loss.detach(), top1])
        steps += 1
    model.train(was_training)
    total = distributed.all_reduce_mean(total / max(steps, 1))
    return float(total[0]), float(total[1])


def backbone_knn(backbone: nn.Module, split: LabeledSplit, device, k: int, temperature: float,
                 batch_size: int = 256) -> dict:
    """kNN top-1/top-5 of backbone features: bank = split.train_*, queries = split.test_*."""
    bank = _features(backbone, split.train_images, device, batch_size)  # collective under torch.distributed
    queries = _features(backbone, split.test_images, device, batch_size)
    if distributed.rank() != 0:
        return {"top1": float("nan")}  # only rank 0 logs
    return knn_classify(bank, split.train_labels, queries, split.test_labels, KNNOptions(k=k, temperature=temperature))


def probe_rows(backbone: nn.Module, random_backbone: nn.Module, split: LabeledSplit, device, k: int,
               temperature: float, seed: int, batch_size: int = 256) -> dict:
    """Linear probe and kNN top-1 of the learned and the random-init backbone on the held-out test split.

    Returns {"simclr": {...}, "random_init": {...}} on rank 0 and {} on the other ranks."""
    results, knn = {}, KNNOptions(k=k, temperature=temperature)
    for name, net in (("simclr", backbone), ("random_init", random_backbone)):
        train_x = _features(net, split.train_images, device, batch_size)
        test_x = _features(net, split.test_images, device, batch_size)
        if distributed.rank() != 0:
            continue  # features are collective; the classifiers run on rank 0 only
        results[name] = {
            "linear_top1": linear_probe(train_x, split.train_labels, test_x, split.test_labels, seed=seed)["top1"],
            "knn_top1": knn_classify(train_x, split.train_labels, test_x, split.test_labels, knn)["top1"],
        }
    return results


def _features(backbone: nn.Module, images: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    was_training = backbone.training
    features, _ = extract_features(backbone, images, batch_size=batch_size, device=device, transform=normalize)
    backbone.train(was_training)
    return features
