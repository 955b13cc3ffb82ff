"""Step overhead: the full SimCLR step (DDP, gathered NT-Xent, LARS, AMP) vs the bare model forward/backward.

    python -m benchmarks.step [--device cpu|cuda|cuda:N] [--model resnet18] [--image-size 32] [--batch 64] [--amp off]
    torchrun --nproc_per_node=2 -m benchmarks.step ...   (the gather and all-reduce over 2 processes)
"""
from __future__ import annotations

import argparse

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.common import add_device_argument, emit, environment, interleaved_rates, resolve_device
from trainer import distributed
from trainer.config import ModelConfig
from trainer.loss import NTXentLoss
from trainer.model import build_model
from trainer.optim import LARS, param_groups
from trainer.step import resolve_amp, train_step


def measure(ctx, base_model: str, image_size: int, per_rank_batch: int, amp: str, channels_last: bool,
            rounds: int, compile_model: bool = False) -> dict:
    device = ctx.device
    amp_dtype = resolve_amp(amp, device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_model=base_model, small_stem=image_size <= 96)).to(device)
    memory_format = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    model.to(memory_format=memory_format)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        ddp = torch.compile(ddp)
    x1, x2 = (torch.randn(per_rank_batch, 3, image_size, image_size, device=device)
              .contiguous(memory_format=memory_format) for _ in range(2))
    optimizer = LARS(param_groups(model, 1e-6), lr=0.1, weight_decay=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = NTXentLoss(0.2)

    def full_step():
        train_step(ddp, loss_fn, optimizer, scaler, x1, x2, amp_dtype)

    def bare_step():  # the same model, the same views: forward + backward, nothing else
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            z = model(torch.cat([x1, x2]))
        z.float().square().mean().backward()

    rates = interleaved_rates({"full_step": full_step, "bare_forward_backward": bare_step}, per_rank_batch,
                              device, rounds=rounds)
    world = ctx.world_size
    return {"img_per_s_per_rank": rates, "img_per_s_global": {k: v * world for k, v in rates.items()},
            "overhead_ratio": rates["full_step"] / rates["bare_forward_backward"],
            "goal": "overhead_ratio >= 0.90"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch (images; two views each)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    world = distributed.world_from_env()
    if world.world_size > 1 and ":" in args.device:
        parser.error(f"--device {args.device} names one device; under torchrun use --device cuda "
                     "(each rank takes cuda:LOCAL_RANK)")
    device = resolve_device(args.device, world.local_rank)
    # pick_device maps cuda to cuda:local_rank, so the resolved index goes in as local_rank
    local_rank = device.index if device.type == "cuda" else world.local_rank
    ctx = distributed.init(distributed.WorldInfo(world.rank, local_rank, world.world_size, world.restart_count,
                                                 world.launcher_pid), device.type)
    try:
        result = measure(ctx, args.model, args.image_size, args.batch, args.amp, not args.no_channels_last,
                         args.rounds)
    finally:
        distributed.shutdown()
    if ctx.is_main:
        emit({"benchmark": "step", "environment": environment(), "world_size": ctx.world_size,
              "config": vars(args), "results": result}, args.out)


if __name__ == "__main__":
    main()
