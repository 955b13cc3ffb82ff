"""The supervised reference for the quickstart's table: the same backbone trained with the labels, same probes.

    python -m benchmarks.digits_supervised [--config configs/quickstart.yaml] [--epochs 15] [--seeds 0 1 2]
        [--min-scale 0.5] [--threads 2] [--out DIR]

What SimCLR's frozen features could reach on digits: the config's backbone (seeded as trainer.model builds it)
trained with cross-entropy on the labeled training part of each seed's split (the part the probes fit on), with
the config's colour augmentation and random-resized crops of at least --min-scale of the area; SGD (momentum 0.9,
weight decay 5e-4, batch 128, one-cycle lr peaking at 0.1). Then the quickstart's probes on the held-out test split
(trainer.evaluation.monitor.probe_rows: linear probe and weighted kNN of the frozen backbone), next to the same
backbone at its random initialization and PCA. The report gives both probes per seed, the means, and the training
time and rate.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn as nn

from benchmarks.common import cpu_model, emit_with_summary, environment
from benchmarks.peer_lightly import REPO, digits_parser, pca_rows, pretrain_and_labeled
from data.crop import random_resized_crop_flip
from trainer.config_load import load_config
from trainer.evaluation.monitor import probe_rows
from trainer.inputs import build_augment
from trainer.model import build_model, random_init_backbone

BATCH, PEAK_LR, MOMENTUM, WEIGHT_DECAY = 128, 0.1, 0.9, 5e-4


def train_supervised(cfg, labeled, epochs: int, min_scale: float) -> tuple[nn.Module, dict]:
    """The backbone after `epochs` of cross-entropy training on labeled.train_*; (backbone, timing)."""
    torch.manual_seed(cfg.seed)  # the initialization trainer.model.build_network makes for this seed
    model = build_model(cfg.model)
    backbone = model.backbone
    classifier = nn.Linear(model.feature_dim, int(labeled.train_labels.max()) + 1)
    params = [*backbone.parameters(), *classifier.parameters()]
    optimizer = torch.optim.SGD(params, lr=PEAK_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    images, labels = labeled.train_images, labeled.train_labels
    steps_per_epoch = len(images) // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, PEAK_LR, total_steps=epochs * steps_per_epoch)
    augment, generator = build_augment(cfg), torch.Generator().manual_seed(cfg.seed)
    backbone.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * BATCH:(step + 1) * BATCH]
            views = random_resized_crop_flip(images[idx], cfg.dataset.image_size, generator, scale=(min_scale, 1.0),
                                             flip_prob=cfg.dataset.flip_prob)
            loss = nn.functional.cross_entropy(classifier(backbone(augment(views, generator))), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_s, final_loss = time.perf_counter() - start, float(loss.detach())
    if not math.isfinite(final_loss):
        raise RuntimeError(f"supervised run, seed {cfg.seed}: the loss became {final_loss}")
    return backbone, {"train_s": train_s, "steps": epochs * steps_per_epoch, "final_loss": final_loss}


def markdown(report: dict) -> str:
    cfg, s = report["config"], report["summary"]
    lines = [f"# Supervised reference on digits ({cfg['model']}, {cfg['image_size']} px, {cfg['epochs']} epochs, "
             f"crops >= {cfg['min_scale']:.0%}, seeds {cfg['seeds']})", "",
             f"CPU: {report['cpu_model']}, {report['threads']} torch threads; held-out test split, the quickstart's "
             f"probes (linear / kNN top-1).", "", "| seed | supervised | random init | PCA |", "|---|---|---|---|"]
    for run, pca in zip(report["runs"], report["pca"]):
        rnd = run["random_init"]
        lines.append(f"| {run['seed']} | {run['linear_top1']:.2%} / {run['knn_top1']:.2%} | "
                     f"{rnd['linear_top1']:.2%} / {rnd['knn_top1']:.2%} | "
                     f"{pca['linear_top1']:.2%} / {pca['knn_top1']:.2%} |")
    lines += [f"| mean | {s['linear_top1']:.2%} / {s['knn_top1']:.2%} | {s['random_linear_top1']:.2%} / "
              f"{s['random_knn_top1']:.2%} | {s['pca_linear_top1']:.2%} / {s['pca_knn_top1']:.2%} |", "",
              f"Training: {s['train_s_mean']:.1f} s a seed, {s['steps_per_s']:.2f} steps/s of {BATCH} images."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = digits_parser("digits_supervised", __doc__, epochs=15)
    parser.add_argument("--min-scale", type=float, default=0.5, help="smallest crop area of the supervised views")
    args = parser.parse_args(argv)
    if args.epochs < 1 or not 0 < args.min_scale <= 1:
        parser.error(f"--epochs {args.epochs} must be >= 1 and --min-scale {args.min_scale} in (0, 1]")
    torch.set_num_threads(args.threads)
    runs, pca = [], []
    for seed in args.seeds:
        cfg = load_config(REPO / args.config, [f"seed={seed}"])
        _, _, labeled = pretrain_and_labeled(cfg)
        backbone, timing = train_supervised(cfg, labeled, args.epochs, args.min_scale)
        rows = probe_rows(backbone, random_init_backbone(cfg, torch.device("cpu")), labeled, torch.device("cpu"),
                          cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.seed)
        runs.append({"seed": seed, **rows["simclr"], "random_init": rows["random_init"], **timing})
        pca.append(pca_rows(labeled, cfg))
        print(f"seed {seed} supervised: linear {runs[-1]['linear_top1']:.4f} knn {runs[-1]['knn_top1']:.4f} "
              f"({timing['train_s']:.1f} s, {timing['steps']} steps)", flush=True)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    random_init = [r["random_init"] for r in runs]
    summary = {"linear_top1": mean(runs, "linear_top1"), "knn_top1": mean(runs, "knn_top1"),
               "random_linear_top1": mean(random_init, "linear_top1"), "random_knn_top1": mean(random_init, "knn_top1"),
               "pca_linear_top1": mean(pca, "linear_top1"), "pca_knn_top1": mean(pca, "knn_top1"),
               "train_s_mean": mean(runs, "train_s"),
               "steps_per_s": sum(r["steps"] for r in runs) / sum(r["train_s"] for r in runs)}
    report = {"benchmark": "digits_supervised", "environment": environment(), "cpu_model": cpu_model(),
              "threads": args.threads,
              "config": {"file": args.config, "model": cfg.model.base_model, "image_size": cfg.dataset.image_size,
                         "epochs": args.epochs, "min_scale": args.min_scale, "seeds": args.seeds},
              "summary": summary, "runs": runs, "pca": pca}
    emit_with_summary(report, args.out, "digits_supervised", markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
