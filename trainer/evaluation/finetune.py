"""`python -m trainer.finetune`: semi-supervised fine-tuning of a pretrained backbone with a new linear head on 1%,
10% or 100% of the labels (class-balanced subsets), as in the SimCLR paper's semi-supervised table.

    python -m trainer.finetune --fine-tune-from runs/quickstart --dataset digits --label-fraction 0.1

The whole network is trained (Nesterov SGD, cosine schedule, random-resized-crop + flip only, as the paper);
accuracy is reported on the held-out test split. `--fine-tune-from` takes what the config key of the same
name takes: a checkpoint file, a run directory or an exported backbone.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.augment import normalize
from data.crop import random_resized_crop_flip
from data.splits import balanced_subset
from trainer.evaluation.evaluate import labeled_splits, load_evaluated_backbone
from trainer.optim import lr_at, set_lr


@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tuning recipe (the command's defaults): Nesterov SGD at lr, cosine-decayed to 0 over all steps."""

    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 64
    crop_scale: tuple[float, float] = (0.4, 1.0)  # random-resized-crop area range


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def finetune(backbone: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             options: FinetuneOptions, device, seed: int) -> dict:
    """Trains backbone + a new linear head on train = (images uint8 [N, 3, S, S], labels); returns test top-1."""
    (images, labels), (test_images, test_labels) = train, test
    torch.manual_seed(seed)
    with torch.no_grad():
        feature_dim = backbone.eval()(normalize(images[:2].to(device))).shape[1]
    model = Classifier(backbone, feature_dim, int(labels.max()) + 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=options.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = max(1, math.ceil(len(images) / options.batch_size))
    total = options.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for _ in range(options.epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), options.batch_size):
            idx = order[start:start + options.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = random_resized_crop_flip(images[idx], images.shape[-1], generator=g, scale=options.crop_scale)
            set_lr(optimizer, lr_at(step, total, 0, options.lr))
            loss = F.cross_entropy(model(normalize(x.to(device))), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_images), 512):
            logits = model(normalize(test_images[start:start + 512].to(device)))
            correct += (logits.argmax(1).cpu() == test_labels[start:start + 512]).sum().item()
    return {"top1": correct / len(test_images), "train_images": len(images), "steps": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fine-tune-from", required=True)
    parser.add_argument("--dataset", default="digits", choices=["digits"],
                        help="in-memory labeled sets (large sets: use the linear probe of trainer.eval)")
    parser.add_argument("--label-fraction", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--epochs", type=int, default=FinetuneOptions.epochs)
    parser.add_argument("--lr", type=float, default=FinetuneOptions.lr)
    parser.add_argument("--batch-size", type=int, default=FinetuneOptions.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for fraction in args.label_fraction:
        if not 0 < fraction <= 1:
            print(f"error: --label-fraction {fraction}: must be in (0, 1]", file=sys.stderr)
            return 2
    try:
        backbone, random_init, cfg, info = load_evaluated_backbone(args.fine_tune_from, None, None)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (train, train_y), (test, test_y) = labeled_splits(args.dataset, None, cfg.dataset.image_size, cfg.seed)
    options = FinetuneOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    rows = []
    for fraction in args.label_fraction:
        subset = balanced_subset(train_y, fraction, args.seed)
        for name, start in (("SimCLR", backbone), ("Random init", random_init)):
            net = copy.deepcopy(start)  # each run starts from the same weights
            result = finetune(net, (train[subset], train_y[subset]), (test, test_y), options,
                              torch.device(args.device), args.seed)
            rows.append({"label_fraction": fraction, "init": name, **result})
            print(f"{fraction:>6.0%} labels ({result['train_images']:>5d} images)  {name:<12s} "
                  f"top-1 {result['top1']:.1%}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": info["checkpoint"], "rows": rows}, indent=2) + "\n")
    return 0
