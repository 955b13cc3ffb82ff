"""`python -m trainer.export CHECKPOINT OUT.pt`: the backbone as a state_dict that its ResNet loads (torchvision's, or
trainer.small_nets' for the small digits networks)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer import checkpoint


def export_backbone(source: str, out: str) -> dict:
    """Writes the backbone weights of a checkpoint (file or run directory) to `out`; returns them.

    `torchvision.models.resnet18().load_state_dict(torch.load(out), strict=False)` then reports only fc.* as
    missing. Runs trained with model.small_stem=true need the same stem: conv1 = Conv2d(3, 64, 3, 1, 1,
    bias=False) and maxpool = Identity() before loading. The small networks of trainer.small_nets (model.base_model
    resnet8 / resnet8_wide, the quickstart's) load into `trainer.small_nets.BACKBONES[name](small_stem)[0]` instead;
    `python -m trainer.eval --checkpoint OUT.pt --base-model resnet8_wide` evaluates such an export.
    """
    weights = checkpoint.load_backbone_weights(source)
    checkpoint.atomic_save(weights, Path(out))
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=export_backbone.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run's output_dir (its newest checkpoint)")
    parser.add_argument("out", help="where to write the backbone state_dict (.pt)")
    args = parser.parse_args(argv)
    try:
        weights = export_backbone(args.checkpoint, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(weights)} backbone tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
