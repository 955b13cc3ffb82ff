"""`python -m trainer.eval`: the seed's results table (linear probe and kNN on frozen features, PCA baseline rows).

    python -m trainer.eval --checkpoint runs/quickstart --dataset digits
    torchrun --nproc_per_node=8 -m trainer.eval --checkpoint runs/stl10_r18 --dataset stl10 --data-dir datasets/stl10

Rows: SimCLR backbone, the same backbone at random initialization, PCA on raw pixels (<= 256 dims) and raw
pixels (small sets), each with a logistic-regression probe (standardized features, as the seed's StandardScaler;
PCA's components as they come, as the seed's PCA rows: pca.PCA_PROBE) and a weighted kNN (k=200, T=0.1,
cosine on features centered by the train mean; --knn-plain: uncentered).
Features are extracted once (sharded across ranks under torchrun, AMP on CUDA); the classifiers run on rank 0.
Writes eval.json and eval.md next to the checkpoint (or to --out); with --split validation (digits: a stratified
part of the training split stands in for the test split, to choose recipes) eval_validation.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from data.augment import normalize
from data.sources import resolve_data_path
from data.splits import stratified_split
from trainer import checkpoint, distributed
from trainer.config import Config, ModelConfig
from trainer.config_load import load_config
from trainer.evaluation.features import extract_features
from trainer.evaluation.pca import pca_baseline, raw_pixels
from trainer.evaluation.probe import KNNOptions, knn_classify, linear_probe
from trainer.evaluation.report import ARCHITECTURE_NAMES, markdown_table, result_row
from trainer.model import build_backbone
from trainer.step import resolve_amp

# ----------------------------------------------------------------------------- data
# ImageNet's evaluation protocol: shorter side resized to S / 0.875 (256 for 224), then the central S x S
CENTER_CROP_FRACTION = {"imagefolder": 0.875}


class _Resized(torch.utils.data.Dataset):
    """A torchvision data set as (uint8 [3, S, S], label): shorter side resized to S / crop_fraction, then the
    central S x S (the probe's protocol; crop_fraction 1 for the fixed-size sets: STL10 96, CIFAR 32)."""

    def __init__(self, dataset, image_size: int, crop_fraction: float = 1.0):
        from torchvision.transforms import v2

        self.dataset = dataset
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize(round(image_size / crop_fraction), antialias=True),
                                     v2.CenterCrop(image_size)])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image.convert("RGB")), label


def labeled_splits(name: str, data_dir: str | None, image_size: int, seed: int, test_fraction: float = 0.3,
                   split: str = "test", val_fraction: float = 0.2):
    """(train, test) each as (images tensor or Dataset, labels or None) for the evaluation protocol.

    split="validation" (digits): the held-out test part is left out altogether; a stratified val_fraction of the
    training part (seed + 1) takes its place and the rest is the train part. For choosing a recipe without
    looking at the test split (pretraining saw those images, unlabeled, as it saw every training image).
    """
    if split not in ("test", "validation"):
        raise ValueError(f"split={split!r}: choose test or validation")
    if name == "digits":
        from data.digits import load_digits_uint8

        images, labels = load_digits_uint8(image_size)
        train, test = stratified_split(labels, test_fraction, seed=seed)  # the split pretraining never saw
        if split == "validation":
            fit, val = stratified_split(labels[train], val_fraction, seed=seed + 1)
            train, test = train[fit], train[val]
        return (images[train], labels[train]), (images[test], labels[test])
    if split != "test":
        raise ValueError(f"--split {split}: only digits has a validation protocol here (its labels are in memory)")
    data_dir = resolve_data_path(data_dir)  # datasets/... under $SIMCLR_DATA when set
    if not data_dir or not Path(data_dir).exists():
        raise FileNotFoundError(f"--data-dir {data_dir!r}: the {name} data directory does not exist")
    import torchvision.datasets as tvd

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        splits = cls(data_dir, train=True), cls(data_dir, train=False)
    elif name == "stl10":
        splits = tvd.STL10(data_dir, split="train"), tvd.STL10(data_dir, split="test")
    elif name == "imagefolder":
        splits = tvd.ImageFolder(Path(data_dir) / "train"), tvd.ImageFolder(Path(data_dir) / "val")
    else:
        raise ValueError(f"--dataset {name}: choose digits, cifar10, cifar100, stl10 or imagefolder")
    return tuple((_Resized(ds, image_size, CENTER_CROP_FRACTION.get(name, 1.0)), None) for ds in splits)


# ----------------------------------------------------------------------------- model
def load_evaluated_backbone(source: str, base_model: str | None, small_stem: bool | None
                            ) -> tuple[nn.Module, nn.Module, Config, dict]:
    """(pretrained backbone, random-init backbone of the same architecture, run config, info)."""
    path = checkpoint.resolve_fine_tune(source)
    if path is None:
        raise FileNotFoundError(f"--checkpoint {source}: no checkpoint file or run directory")
    state = checkpoint.load(path)
    cfg = Config()
    if "config" in state:  # a training checkpoint knows its own architecture and input size
        run_yaml = Path(path).parent.parent / "config.yaml"
        cfg = load_config(run_yaml) if run_yaml.is_file() else cfg
        weights = checkpoint.backbone_state(state["model"])
        info = {"epochs": state.get("epoch"), "head_dim": cfg.model.out_dim, "run_dir": str(Path(path).parent.parent)}
    else:  # an exported backbone state_dict
        weights, info = state, {"epochs": "", "head_dim": "-", "run_dir": str(Path(path).parent)}
    model_cfg = ModelConfig(base_model=base_model or cfg.model.base_model,
                            small_stem=cfg.model.small_stem if small_stem is None else small_stem)
    cfg.model = model_cfg
    torch.manual_seed(cfg.seed)  # the same random init the run started from
    random_init, _ = build_backbone(model_cfg.base_model, model_cfg.small_stem)
    backbone, _ = build_backbone(model_cfg.base_model, model_cfg.small_stem)
    backbone.load_state_dict(weights)
    return backbone, random_init, cfg, {**info, "checkpoint": str(path)}


# ----------------------------------------------------------------------------- protocol
def evaluate(args) -> dict:
    world = distributed.world_from_env()
    ctx = distributed.init(world, args.device)
    try:
        backbone, random_init, cfg, info = load_evaluated_backbone(args.checkpoint, args.base_model, args.small_stem)
        size = args.image_size or cfg.dataset.image_size
        (train_src, train_y), (test_src, test_y) = labeled_splits(
            args.dataset, args.data_dir, size, cfg.seed, cfg.eval.test_fraction, args.split, args.val_fraction)
        amp = resolve_amp("auto", ctx.device)
        feats = {}
        for name, net in (("SimCLR", backbone), ("Random init", random_init)):
            net.to(ctx.device)
            tr, tr_y = extract_features(net, train_src, args.batch_size, ctx.device, normalize, amp)
            te, te_y = extract_features(net, test_src, args.batch_size, ctx.device, normalize, amp)
            feats[name] = (tr, te)
            train_y = tr_y if train_y is None else train_y
            test_y = te_y if test_y is None else test_y
        if not ctx.is_main:
            return {}
        rows = _rows(args, feats, train_src, test_src, train_y, test_y, cfg, info)
        knn = {"k": args.knn_k, "temperature": args.knn_temperature, "centered": not args.knn_plain}
        return {"dataset": args.dataset, "split": args.split, "image_size": size, "knn": knn, "rows": rows, **info}
    finally:
        distributed.shutdown()


def _rows(args, feats, train_src, test_src, train_y, test_y, cfg, info) -> list[dict]:
    arch = ARCHITECTURE_NAMES[cfg.model.base_model]
    knn_options = KNNOptions(k=args.knn_k, temperature=args.knn_temperature, center=not args.knn_plain)
    rows = []

    def add(extractor, architecture, train_x, test_x, head_dim, epochs):
        lin = linear_probe(train_x, train_y, test_x, test_y, seed=cfg.seed, device=args.probe_device)["top1"]
        knn = knn_classify(train_x, train_y, test_x, test_y, knn_options)["top1"]
        dim = train_x.shape[1]
        rows.append(result_row("Logistic Regression", extractor, architecture, dim, head_dim, epochs, lin))
        rows.append(result_row("KNN", extractor, architecture, dim, head_dim, epochs, knn))

    if isinstance(train_src, torch.Tensor):  # raw pixels fit in memory: the PCA baseline as the seed's rows
        raw_tr, raw_te = raw_pixels(train_src), raw_pixels(test_src)
        pca = pca_baseline(raw_tr, train_y, raw_te, test_y, knn_options, seed=cfg.seed, device=args.probe_device)
        rows.append(result_row("Logistic Regression", "PCA Features", "-", pca["dim"], "-", "", pca["linear_top1"]))
        rows.append(result_row("KNN", "PCA Features", "-", pca["dim"], "-", "", pca["knn_top1"]))
        if raw_tr.shape[1] <= 4096:
            add("Raw pixels", "-", raw_tr, raw_te, "-", "")
    add("Random init", arch, *feats["Random init"], "-", 0)
    add("SimCLR", arch, *feats["SimCLR"], info["head_dim"], info["epochs"])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint, run directory or exported backbone")
    parser.add_argument("--dataset", default="digits",
                        choices=["digits", "stl10", "cifar10", "cifar100", "imagefolder"])
    parser.add_argument("--data-dir", help="torchvision data root (imagefolder: a folder with train/ and val/)")
    parser.add_argument("--image-size", type=int, help="default: the run's dataset.input_shape")
    parser.add_argument("--base-model", choices=sorted(ARCHITECTURE_NAMES),
                        help="for exported backbones (default resnet18)")
    parser.add_argument("--split", default="test", choices=["test", "validation"],
                        help="test: the held-out split; validation (digits): a stratified part of the training "
                             "split instead, for choosing a recipe without the test split")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the training split (--split validation)")
    parser.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--knn-k", type=int, default=KNNOptions.k)
    parser.add_argument("--knn-temperature", type=float, default=KNNOptions.temperature)
    parser.add_argument("--knn-plain", action="store_true",
                        help="kNN on uncentered features (InstDisc as published); default: centered by the train mean")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--probe-device", default=None, help="where the linear probe trains (default: CUDA if any)")
    parser.add_argument("--out", help="folder for eval.json and eval.md (default: the run directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not result:
        return 0
    out = Path(args.out or result["run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result["rows"])
    stem = "eval" if args.split == "test" else "eval_validation"  # a validation look never replaces the table
    where = "held-out test split" if args.split == "test" else "validation part of the training split"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(f"{args.dataset}, {where}\n\n{table}\n")
    print(table)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0
