"""`python -m trainer.plan`: per-device views and estimated peak memory of each step mode; a recommended chunk size.

    python -m trainer.plan --config configs/imagenet_r50_b8192_1node.yaml --world-size 8 --device-memory 80GB

Activation memory is measured, not guessed: one view goes through the model on the CPU (in the configured
AMP dtype) while autograd's saved-tensor hooks count the bytes kept for backward. Model states are
parameters + gradients + one optimizer buffer (fp32). Estimates ignore allocator fragmentation and
cuDNN workspaces: keep the recommended margin.
"""
from __future__ import annotations

import argparse
import re
import sys

import torch
import torch.nn as nn

from trainer.cached_step import auto_chunk_size
from trainer.config import ConfigError, load_config
from trainer.model import build_model, enable_activation_checkpointing

GIB = 2 ** 30


def saved_bytes_per_view(model: nn.Module, image_size: int, amp_dtype: torch.dtype | None
                         ) -> tuple[float, float]:
    """(bytes autograd keeps for backward per view, the largest share of one backbone stage), distinct
    storages counted once."""
    seen: dict[int, int] = {}
    stage_bytes, marks = [], {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(getattr(model, "backbone", model), name, None)
        if stage is not None:
            hooks.append(stage.register_forward_pre_hook(lambda m, i, n=name: marks.update({n: sum(seen.values())})))
            hooks.append(stage.register_forward_hook(
                lambda m, i, o, n=name: stage_bytes.append(sum(seen.values()) - marks[n])))
    model.train()
    x = torch.randn(2, 3, image_size, image_size)  # 2 views: BatchNorm needs more than one value per channel
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values()) / 2, max(stage_bytes, default=0) / 2


def parse_bytes(text: str) -> float:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--device-memory {text!r}: use e.g. 80GB or 141GiB")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[match.group(2).upper()]
    return float(match.group(1)) * scale


def plan(cfg, world_size: int, device_memory: float) -> dict:
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, torch.bfloat16 if cfg.amp == "auto" else None)
    model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    states = params * 4 * 3  # fp32 weights, gradients, momentum
    per_rank_views = 2 * cfg.batch_size // world_size
    global_views = 2 * cfg.batch_size
    logits = per_rank_views * global_views * 4 * 3  # fp32 logits, softmax, gradient slice
    act, stage_peak = saved_bytes_per_view(model, cfg.dataset.image_size, amp_dtype)
    checkpointed = build_model(cfg.model)
    enable_activation_checkpointing(checkpointed.backbone)
    boundary, _ = saved_bytes_per_view(checkpointed, cfg.dataset.image_size, amp_dtype)
    budget = device_memory - states - logits
    chunk = auto_chunk_size(per_rank_views, act, max(budget, 0.0))
    modes = {
        "direct": states + logits + act * per_rank_views,
        "checkpoint": states + logits + (boundary + stage_peak) * per_rank_views,  # one stage recomputed at a time
        "cached": states + logits + act * chunk + per_rank_views * cfg.model.out_dim * 4 * 2,
    }
    return {"world_size": world_size, "global_batch": cfg.batch_size, "views_per_device": per_rank_views,
            "activation_bytes_per_view": act, "checkpointed_bytes_per_view": boundary, "model_state_bytes": states,
            "logit_bytes": logits, "device_memory_bytes": device_memory, "recommended_chunk_views": chunk,
            "peak_bytes": modes, "fits": {mode: peak <= 0.9 * device_memory for mode, peak in modes.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, required=True, help="total number of GPUs (ranks)")
    parser.add_argument("--device-memory", default="80GB", help="memory of one device, e.g. 80GB, 141GB")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.batch_size % args.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by --world-size {args.world_size}")
        result = plan(cfg, args.world_size, parse_bytes(args.device_memory))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{cfg.model.base_model} at {cfg.dataset.image_size}px, global batch {cfg.batch_size} on "
          f"{args.world_size} devices: {result['views_per_device']} views per device per step")
    print(f"activations {result['activation_bytes_per_view'] / 2**20:.1f} MiB/view (checkpointed "
          f"{result['checkpointed_bytes_per_view'] / 2**20:.1f}), model states {result['model_state_bytes'] / GIB:.2f} GiB,"
          f" logits {result['logit_bytes'] / GIB:.2f} GiB")
    for mode, peak in result["peak_bytes"].items():
        verdict = "fits" if result["fits"][mode] else "does NOT fit"
        print(f"  step_mode={mode:<10s} peak ~{peak / GIB:8.1f} GiB  {verdict} in {args.device_memory}")
    print(f"recommended: cached_chunk_size={result['recommended_chunk_views']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
