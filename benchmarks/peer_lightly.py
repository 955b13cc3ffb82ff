"""This project's SimCLR against the same recipe written with the lightly library, on digits, same split and evaluation.

    python -m benchmarks.peer_lightly [--config configs/quickstart.yaml] [--epochs 10] [--seeds 0 1 2]
        [--variants project lightly ...] [--threads 2] [--out DIR] [--set key=value ...]

lightly (a benchmark-only dependency: `pip install .[peer]`, never the trainer's) supplies NTXentLoss, LARS and
SimCLRTransform on PIL images in a 2-worker DataLoader, one process, as its examples do. Everything else is the
same for both: the network (trainer.model.build_model, seeded alike), the training images (the digits pool minus
the held-out test split and dataset.valid_size, as trainer.inputs builds them), batch, temperature, the learning-
rate schedule (trainer.optim.lr_at), and the evaluation (trainer.evaluation.monitor.probe_rows: linear probe and
centered kNN of the backbone on the held-out test split, next to the random init; PCA rows from
trainer.evaluation.probe).

A variant is a name with optional settings after colons:
  project[:key=value...]   `python -m trainer.main` with the config, the epochs and these overrides
  lightly[:blur=P][:forward=separate|joint][:lars=lightly|project][:order=lightly|project]
      blur: lightly's GaussianBlur probability (default: the config's dataset.blur_prob; lightly's own default
      is 0.5); forward: one forward per view, each view's BatchNorm statistics apart (lightly's examples, the
      default) or both views in one forward (this project's step); lars: lightly's LARS (lr outside the momentum
      buffer, trust eta*|w| / (|g| + wd*|w|)) or trainer.optim.LARS; order: lightly's view pipeline (crop, flip,
      jitter, grayscale, blur) or this project's (crop, flip in the loader; the batched color ops on the tensor)
The report (JSON + markdown) gives each variant's top-1 per seed, mean and range, its training time and rates.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_model, emit_with_summary, environment, run_trainer
from trainer.config_load import load_config

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the shared data
def pretrain_and_labeled(cfg):
    """(images uint8 [N,3,S,S], pretraining indices, LabeledSplit): what trainer.inputs gives the run, from it."""
    from trainer.distributed import DistContext
    from trainer.inputs import build_pretrain_data

    if cfg.dataset.name != "digits" or cfg.dataset.loader != "memory":
        raise SystemExit("the peer comparison runs on digits held in memory (dataset.name=digits, loader=memory)")
    data = build_pretrain_data(cfg, DistContext(0, 0, 1, torch.device("cpu"), "gloo"))
    return data.train.images, data.train.indices, data.labeled


def pca_rows(labeled, cfg) -> dict:
    from trainer.evaluation.pca import pca_baseline, raw_pixels
    from trainer.evaluation.probe import KNNOptions

    knn = KNNOptions(k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    row = pca_baseline(raw_pixels(labeled.train_images), labeled.train_labels, raw_pixels(labeled.test_images),
                       labeled.test_labels, knn, seed=cfg.seed)
    return {"linear_top1": row["linear_top1"], "knn_top1": row["knn_top1"]}


# ----------------------------------------------------------------------------- this project
def run_project(config: str, overrides: list[str], workdir: Path, threads: int) -> dict:
    """One `python -m trainer.main` process; its final probe record (the held-out test split) and timing."""
    out = workdir / "run"
    cmd = [sys.executable, "-m", "trainer.main", "--config", config, f"output_dir={out}", "eval.knn_monitor=false",
           *overrides]
    records, wall_s = run_trainer(cmd, threads, out)
    final = next(r for r in records if r["kind"] == "final")
    train_s = sum(r["epoch_time_s"] for r in records if r["kind"] == "epoch")
    steps = final["step"]
    return {"simclr": {"linear_top1": final["simclr/linear_top1"], "knn_top1": final["simclr/knn_top1"]},
            "random_init": {"linear_top1": final["random_init/linear_top1"],
                            "knn_top1": final["random_init/knn_top1"]},
            "train_s": train_s, "wall_s": wall_s, "steps": steps}


# ----------------------------------------------------------------------------- lightly
class _PILDigits(torch.utils.data.Dataset):
    """The pretraining images as PIL images (the form lightly's transforms take), two views each."""

    def __init__(self, images: torch.Tensor, transform):
        from PIL import Image

        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i])


class _ProjectOrder:
    """This project's order inside one DataLoader item: crop (+ flip) on uint8, then the color ops and normalize
    as trainer.inputs.build_augment does them (per-sample parameters from torch's generator in the worker)."""

    def __init__(self, cfg):
        from data.crop import random_resized_crop_flip
        from trainer.inputs import build_augment

        self.cfg, self.crop, self.augment = cfg, random_resized_crop_flip, build_augment(cfg)

    def __call__(self, image):
        import numpy as np

        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)
        d = self.cfg.dataset
        return [self.augment(self.crop(x, d.image_size, scale=(d.crop_min_scale, 1.0), flip_prob=d.flip_prob))[0]
                for _ in range(2)]


def run_lightly(cfg, images, train_idx, labeled, options: dict, threads: int) -> dict:
    from lightly.loss import NTXentLoss
    from lightly.transforms import SimCLRTransform
    from lightly.utils.lars import LARS as LightlyLARS

    from trainer.evaluation.monitor import probe_rows
    from trainer.model import build_model
    from trainer.optim import LARS, lr_at, param_groups, set_lr

    torch.set_num_threads(threads)
    d = cfg.dataset
    if options.get("order", "lightly") == "project":
        transform = _ProjectOrder(cfg)
    else:
        transform = SimCLRTransform(input_size=d.image_size, cj_prob=d.jitter_prob, cj_strength=d.s,
                                    min_scale=d.crop_min_scale, random_gray_scale=d.grayscale_prob,
                                    gaussian_blur=float(options.get("blur", d.blur_prob)), hf_prob=d.flip_prob)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(_PILDigits(images[train_idx], transform), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=True, num_workers=2, generator=generator,
                                         persistent_workers=True)
    torch.manual_seed(cfg.seed)  # the same initial network as trainer.model.build_network
    model = build_model(cfg.model)
    initial_backbone = build_model(cfg.model).backbone
    initial_backbone.load_state_dict(model.backbone.state_dict())
    groups = param_groups(model, cfg.optim.weight_decay)  # weights decay and get the trust ratio; biases, BN not
    peak_lr = cfg.optim.peak_lr(cfg.batch_size)
    if options.get("lars", "lightly") == "project":
        optimizer = LARS(groups, lr=peak_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                         trust_coefficient=cfg.optim.trust_coefficient)
    else:
        optimizer = LightlyLARS(groups, lr=peak_lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, trust_coefficient=cfg.optim.trust_coefficient)
    criterion = NTXentLoss(temperature=cfg.loss.temperature)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch))
    joint = options.get("forward", "separate") == "joint"
    step, train_s, last_loss = 0, 0.0, float("nan")
    model.train()
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        for x0, x1 in loader:
            set_lr(optimizer, lr_at(step, total_steps, warmup_steps, peak_lr, cfg.optim.final_lr))
            if joint:
                z0, z1 = model(torch.cat([x0, x1])).chunk(2)
            else:
                z0, z1 = model(x0), model(x1)
            loss = criterion(z0, z1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        last_loss = float(loss.detach())  # host sync: once an epoch
        train_s += time.perf_counter() - start
    if not math.isfinite(last_loss):
        raise RuntimeError(f"lightly run {options}: the loss became {last_loss}")
    results = probe_rows(model.backbone, initial_backbone, labeled, torch.device("cpu"), cfg.eval.knn_k,
                         cfg.eval.knn_temperature, cfg.seed)
    return {**results, "train_s": train_s, "steps": step, "final_loss": last_loss}


# ----------------------------------------------------------------------------- driver
def parse_variant(text: str) -> tuple[str, dict | list]:
    kind, *settings = text.split(":")
    if kind == "project":
        return kind, settings
    if kind != "lightly":
        raise SystemExit(f"variant {text!r}: starts with project or lightly")
    options = dict(s.split("=", 1) for s in settings)
    allowed = {"blur": None, "forward": ("separate", "joint"), "lars": ("lightly", "project"),
               "order": ("lightly", "project")}
    for key, value in options.items():
        if key not in allowed or (allowed[key] and value not in allowed[key]):
            raise SystemExit(f"variant {text!r}: {key}={value} is not one of {allowed}")
    return kind, options


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("linear_top1", "knn_top1"):
        values = [r["simclr"][key] for r in runs]
        out[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "per_seed": values}
    out["train_s_mean"] = sum(r["train_s"] for r in runs) / len(runs)
    steps = sum(r["steps"] for r in runs)
    out["steps_per_s"] = steps / sum(r["train_s"] for r in runs)
    return out


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# This project vs lightly on digits ({cfg['model']}, {cfg['image_size']} px, batch {cfg['batch_size']}, "
             f"{cfg['epochs']} epochs, seeds {cfg['seeds']})", "",
             f"CPU: {report['cpu_model']}, {report['threads']} torch threads; held-out test split "
             f"(a stratified {cfg['test_fraction']:.0%} per seed), this project's probes.", "",
             "| variant | linear probe (mean, range) | kNN (mean, range) | train s (mean) | steps/s | img/s |",
             "|---|---|---|---|---|---|"]
    for name, s in report["summary"].items():
        lin, knn = s["linear_top1"], s["knn_top1"]
        lines.append(f"| {name} | {lin['mean']:.2%} ({lin['min']:.1%}-{lin['max']:.1%}) | {knn['mean']:.2%} "
                     f"({knn['min']:.1%}-{knn['max']:.1%}) | {s['train_s_mean']:.1f} | {s['steps_per_s']:.2f} | "
                     f"{s['steps_per_s'] * cfg['batch_size']:.0f} |")
    pca, rnd = report["pca"], report["random_init"]
    lines += ["", "Baselines (mean over seeds): PCA " + f"{pca['linear_top1']:.2%} / {pca['knn_top1']:.2%}, "
              f"random-init backbone {rnd['linear_top1']:.2%} / {rnd['knn_top1']:.2%} (linear / kNN)."]
    return "\n".join(lines) + "\n"


def digits_parser(name: str, doc: str, epochs: int) -> argparse.ArgumentParser:
    """The arguments every digits accuracy benchmark takes: --config, --epochs, --seeds, --threads, --out."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--out", help=f"folder for {name}.json and .md")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = digits_parser("peer_lightly", __doc__, epochs=10)
    parser.add_argument("--variants", nargs="+", default=["project", "lightly"])
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="a config override for both sides (repeat for more)")
    args = parser.parse_args(argv)
    variants = {text: parse_variant(text) for text in args.variants}
    runs: dict[str, list[dict]] = {text: [] for text in variants}
    pca, random_init = [], []
    for seed in args.seeds:
        overrides = [*args.overrides, f"epochs={args.epochs}", f"seed={seed}"]
        cfg = load_config(REPO / args.config, overrides)
        images, train_idx, labeled = pretrain_and_labeled(cfg)
        pca.append(pca_rows(labeled, cfg))
        for text, (kind, options) in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                if kind == "project":
                    result = run_project(args.config, [*overrides, *options], Path(tmp), args.threads)
                else:
                    result = run_lightly(cfg, images, train_idx, labeled, options, args.threads)
            result["seed"] = seed
            runs[text].append(result)
            random_init.append(result["random_init"])
            print(f"seed {seed} {text}: linear {result['simclr']['linear_top1']:.4f} knn "
                  f"{result['simclr']['knn_top1']:.4f}  ({result['train_s']:.1f} s, {result['steps']} steps)",
                  flush=True)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    report = {"benchmark": "peer_lightly", "environment": environment(), "cpu_model": cpu_model(),
              "threads": args.threads,
              "config": {"file": args.config, "overrides": args.overrides, "epochs": args.epochs, "seeds": args.seeds,
                         "model": cfg.model.base_model, "image_size": cfg.dataset.image_size,
                         "batch_size": cfg.batch_size, "temperature": cfg.loss.temperature,
                         "test_fraction": cfg.eval.test_fraction},
              "pca": {k: mean(pca, k) for k in ("linear_top1", "knn_top1")},
              "random_init": {k: mean(random_init, k) for k in ("linear_top1", "knn_top1")},
              "summary": {text: summarize(rs) for text, rs in runs.items()}, "runs": runs}
    emit_with_summary(report, args.out, "peer_lightly", markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
