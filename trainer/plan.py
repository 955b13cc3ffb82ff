"""`python -m trainer.plan`: per-device views and estimated peak memory of each step mode; a recommended chunk size.

    python -m trainer.plan --config configs/imagenet_r50_b8192_1node.yaml --world-size 8 --device-memory 80GB

Activation memory is measured, not guessed: random views go through the model on the CPU (in the configured AMP
dtype) while autograd's saved-tensor hooks count the bytes kept for backward, once with 2 views and once with 4.
Their difference / 2 is the memory of one view; what does not grow with the views is the constant part (under
autocast: the bf16/fp16 copies of the weights, made once per forward). The model's own parameters are left out
of both (they are model states). A device also holds, and the plan adds:

- model states: fp32 parameters, gradients and the optimizer's buffers (LARS/SGD one, Adam two); DDP's gradient
  buckets are one more copy of the gradients unless `gradient_as_bucket_view=True` (which the trainer sets);
- input views: the uint8 views, the float views after the device augmentation and their concatenation, and on
  CUDA with the FFCV loader its device ring of uint8 batches (batches_ahead + 2 = 5 batches);
- the NT-Xent logits slice (fp32 logits, softmax and gradient: 2n x 2N x 4 B x 3);
- a cuDNN workspace allowance (CUDNN_WORKSPACE_BYTES): an allowance, not a measurement; with
  cudnn.benchmark=True cuDNN may pick faster algorithms with larger workspaces.

Estimates ignore allocator fragmentation and transient buffers of the backward pass: keep the recommended
margin (a mode fits when its estimate is at most 90% of the device memory).
"""
from __future__ import annotations

import argparse
import re
import sys

import torch
import torch.nn as nn

from trainer.cached_step import auto_chunk_size
from trainer.config import Config, ConfigError
from trainer.config_load import load_config
from trainer.model import build_model, enable_activation_checkpointing

GIB = 2 ** 30
MIB = 2 ** 20
PROBE_VIEWS = (2, 4)  # BatchNorm needs more than one value per channel; two sizes give the per-view slope
CUDNN_WORKSPACE_BYTES = 1 * GIB  # allowance for cuDNN convolution workspaces (benchmark-mode algorithms)
FFCV_DEVICE_BATCHES = 5  # FFCV's ToDevice ring on CUDA: batches_ahead (3) + 2 batches of uint8 views
OPTIMIZER_BUFFERS = {"lars": 1, "sgd": 1, "adam": 2, "adamw": 2}  # fp32 state tensors per parameter


def saved_bytes(model: nn.Module, image_size: int, amp_dtype: torch.dtype | None, views: int
                ) -> tuple[float, float]:
    """(bytes autograd keeps for backward in one training forward of `views` random views, the largest share of
    one backbone stage); distinct storages counted once, the model's parameters not counted."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    stage_bytes, marks = [], {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
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
    x = torch.randn(views, 3, image_size, image_size)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return float(sum(seen.values())), float(max(stage_bytes, default=0))


def saved_bytes_per_view(model: nn.Module, image_size: int, amp_dtype: torch.dtype | None
                         ) -> tuple[float, float, float]:
    """(bytes per view, constant bytes, the largest backbone stage's bytes per view), from the difference of two
    probe sizes: per view = (bytes(4) - bytes(2)) / 2, constant = bytes(2) - 2 x per view."""
    (small, stage_small), (large, stage_large) = (saved_bytes(model, image_size, amp_dtype, v) for v in PROBE_VIEWS)
    dv = PROBE_VIEWS[1] - PROBE_VIEWS[0]
    per_view, stage = (large - small) / dv, (stage_large - stage_small) / dv
    return per_view, max(small - PROBE_VIEWS[0] * per_view, 0.0), stage


def parse_bytes(text: str) -> float:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--device-memory {text!r}: use e.g. 80GB or 141GiB")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[match.group(2).upper()]
    return float(match.group(1)) * scale


def plan_amp_dtype(amp: str) -> torch.dtype | None:
    """The AMP dtype a GPU run of this config uses (auto: bf16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}.get(amp)


def input_bytes_per_view(cfg: Config, device_type: str = "cuda") -> float:
    """uint8 view + float view after augmentation + its copy in torch.cat([x1, x2]), and FFCV's device ring."""
    pixels = 3 * cfg.dataset.image_size ** 2
    ring = FFCV_DEVICE_BATCHES if cfg.dataset.loader == "ffcv" and device_type == "cuda" else 0
    return pixels * (1 * (1 + ring) + 4 + 4)


def plan(cfg: Config, world_size: int, device_memory: float, gradient_as_bucket_view: bool = True,
         cudnn_workspace: float = CUDNN_WORKSPACE_BYTES, device_type: str = "cuda") -> dict:
    amp_dtype = plan_amp_dtype(cfg.amp)
    model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = params * 4
    states = param_bytes * (2 + OPTIMIZER_BUFFERS[cfg.optim.name])  # fp32 weights, gradients, optimizer buffers
    buckets = 0 if gradient_as_bucket_view else param_bytes  # DDP's bucket copy of the gradients
    per_rank_views = 2 * cfg.batch_size // world_size
    global_views = 2 * cfg.batch_size
    logits = per_rank_views * global_views * 4 * 3  # fp32 logits, softmax, gradient slice
    act, weight_copies, stage_act = saved_bytes_per_view(model, cfg.dataset.image_size, amp_dtype)
    checkpointed = build_model(cfg.model)
    enable_activation_checkpointing(checkpointed.backbone)
    boundary, _, _ = saved_bytes_per_view(checkpointed, cfg.dataset.image_size, amp_dtype)
    inputs = input_bytes_per_view(cfg, device_type)
    embeddings = cfg.model.out_dim * 4 * 2  # cached step: every view's embedding and its gradient, fp32
    fixed = states + buckets + logits + weight_copies + cudnn_workspace + inputs * per_rank_views
    chunk = auto_chunk_size(per_rank_views, act, max(device_memory - fixed - embeddings * per_rank_views, 0.0))
    modes = {
        "direct": fixed + act * per_rank_views,
        "checkpoint": fixed + (boundary + stage_act) * per_rank_views,  # one stage recomputed at a time
        "cached": fixed + act * chunk + embeddings * per_rank_views,
    }
    return {"world_size": world_size, "global_batch": cfg.batch_size, "views_per_device": per_rank_views,
            "amp_dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32"),
            "activation_bytes_per_view": act, "checkpointed_bytes_per_view": boundary,
            "stage_bytes_per_view": stage_act, "weight_copy_bytes": weight_copies, "parameter_count": params,
            "model_state_bytes": states, "ddp_bucket_bytes": buckets, "input_bytes_per_view": inputs,
            "logit_bytes": logits, "cudnn_workspace_bytes": cudnn_workspace, "device_memory_bytes": device_memory,
            "recommended_chunk_views": chunk, "peak_bytes": modes,
            "fits": {mode: peak <= 0.9 * device_memory for mode, peak in modes.items()}}


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
    print(f"activations {result['activation_bytes_per_view'] / MIB:.1f} MiB/view (checkpointed "
          f"{result['checkpointed_bytes_per_view'] / MIB:.1f}), "
          f"model states {result['model_state_bytes'] / GIB:.2f} GiB,"
          f" logits {result['logit_bytes'] / GIB:.2f} GiB")
    print(f"inputs {result['input_bytes_per_view'] / MIB:.2f} MiB/view, {result['amp_dtype']} weight copies "
          f"{result['weight_copy_bytes'] / GIB:.2f} GiB, cuDNN workspace allowance "
          f"{result['cudnn_workspace_bytes'] / GIB:.2f} GiB, DDP buckets {result['ddp_bucket_bytes'] / GIB:.2f} GiB "
          "(gradient_as_bucket_view)")
    for mode, peak in result["peak_bytes"].items():
        verdict = "fits" if result["fits"][mode] else "does NOT fit"
        print(f"  step_mode={mode:<10s} peak ~{peak / GIB:8.1f} GiB  {verdict} in {args.device_memory}")
    print(f"recommended: cached_chunk_size={result['recommended_chunk_views']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
