"""DDP and cuDNN settings side by side against DDP's defaults: steps/s of the full SimCLR step and, on CUDA, its
peak memory.

    python -m benchmarks.ddp [--device cpu|cuda|cuda:N] [--ranks 2] [--model resnet18] [--image-size 32] [--batch 16]

The settings the trainer uses where they apply: gradient_as_bucket_view=True (gradients live in DDP's buckets:
no second copy, no copy into the buckets per step), static_graph=True (the direct step's graph is the same
every step), forward_sync_buffers=False (torch 2.14's name for broadcast_buffers=False: no broadcast of BN
buffers before each forward, the initial one kept; right when every BN layer is synchronized; here it measures
what the broadcast costs) and torch.backends.cudnn.benchmark=True
(CUDA, fixed shapes). Each is measured alone and all together against DDP's defaults, in alternating rounds
within one run (interleaved_rates), on `--ranks` processes started with torch.multiprocessing (gloo on the
CPU, 2 by default; NCCL on CUDA, every visible device by default, or the one of cuda:N). On the CPU the
cudnn_benchmark case changes nothing, so its distance from 1.0 shows how noisy the run was.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.common import add_device_argument, emit, environment, free_port, interleaved_rates, resolve_device, sync

VARIANTS = {  # DDP keyword arguments and cudnn.benchmark of each case
    "ddp_defaults": ({}, False),
    "gradient_as_bucket_view": ({"gradient_as_bucket_view": True}, False),
    "static_graph": ({"static_graph": True}, False),
    "no_forward_buffer_sync": ({"forward_sync_buffers": False}, False),
    "cudnn_benchmark": ({}, True),
    "all_trainer_settings": ({"gradient_as_bucket_view": True, "static_graph": True, "forward_sync_buffers": False},
                             True),
}


def _step_case(model_name: str, image_size: int, batch: int, device: torch.device, ddp_kwargs: dict,
               cudnn_benchmark: bool, amp_dtype):
    """One DDP-wrapped model (same seeded init for every case) and a closure running one full training step."""
    from trainer.config import ModelConfig
    from trainer.loss import NTXentLoss
    from trainer.model import build_model
    from trainer.optim import LARS, param_groups
    from trainer.step import train_step

    torch.manual_seed(0)
    model = build_model(ModelConfig(base_model=model_name, small_stem=image_size <= 96)).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(memory_format=memory_format)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kwargs)
    optimizer = LARS(param_groups(model, 1e-6), lr=0.01, weight_decay=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    x1, x2 = (torch.randn(batch, 3, image_size, image_size, device=device, generator=g)
              .contiguous(memory_format=memory_format) for _ in range(2))
    loss_fn = NTXentLoss(0.2)

    def step():
        torch.backends.cudnn.benchmark = cudnn_benchmark  # a global switch: set before each case's step
        train_step(ddp, loss_fn, optimizer, scaler, x1, x2, amp_dtype)

    return step


def _peak_memory(make_case, device: torch.device) -> float | None:
    """Peak bytes allocated over one step of a case built alone (model, DDP buckets, optimizer state included),
    after two warm-up steps; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    step = make_case()
    step()
    step()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del step
    return float(peak)


def _worker(rank: int, world: int, port: int, device_text: str, args: dict, out: str) -> None:
    device = resolve_device(device_text, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            **({"device_id": device} if backend == "nccl" else {}))
    try:
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
        shape = (args["model"], args["image_size"], args["per_rank_batch"], device)
        memory = {name: _peak_memory(lambda kw=kw, cb=cb: _step_case(*shape, kw, cb, amp_dtype), device)
                  for name, (kw, cb) in VARIANTS.items()}
        cases = {name: _step_case(*shape, kw, cb, amp_dtype) for name, (kw, cb) in VARIANTS.items()}
        rates = interleaved_rates(cases, 1, device, warmup=2, rounds=args["rounds"], calls_per_round=2)
        if rank == 0:
            base = rates["ddp_defaults"]
            result = {"steps_per_s": rates, "speed_over_defaults": {k: v / base for k, v in rates.items()},
                      "peak_step_bytes": memory}
            if device.type == "cuda":
                result["memory_over_defaults"] = {k: v / memory["ddp_defaults"] for k, v in memory.items()}
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(device: str = "cpu", ranks: int = 0, model: str = "", image_size: int = 0, batch: int = 0,
        rounds: int = 3) -> dict:
    """Starts the ranks, returns rank 0's numbers with the machine and the configuration."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    one_device = cuda and ":" in device  # cuda:N: that device, one rank
    if one_device and ranks > 1:
        raise ValueError(f"--device {device} names one device: use --device cuda for {ranks} ranks")
    ranks = ranks or (1 if one_device else torch.cuda.device_count() if cuda else 2)
    model = model or ("resnet50" if cuda else "resnet18")
    image_size = image_size or (224 if cuda else 32)
    batch = batch or (128 if cuda else 16)
    config = {"device": str(dev) if one_device else dev.type, "ranks": ranks, "backend": "nccl" if cuda else "gloo",
              "model": model, "image_size": image_size, "per_rank_batch": batch, "rounds": rounds,
              "amp": "bf16" if cuda else "off"}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp.json")
        mp.spawn(_worker, args=(ranks, free_port(), str(dev) if one_device else dev.type, config, out),
                 nprocs=ranks, join=True)
        results = json.loads(Path(out).read_text())
    return {"benchmark": "ddp", "environment": environment(), "config": config, "results": results,
            "note": "forward_sync_buffers=False is what the trainer uses only when every BN layer is synchronized"
                    + ("" if cuda else "; cudnn_benchmark does nothing on the CPU: its ratio is the run's noise")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser, default="cpu")
    parser.add_argument("--ranks", type=int, default=0, help="processes (default: 2 on CPU, every GPU on cuda)")
    parser.add_argument("--model", default="", help="default resnet18 on CPU, resnet50 on CUDA")
    parser.add_argument("--image-size", type=int, default=0, help="default 32 on CPU, 224 on CUDA")
    parser.add_argument("--batch", type=int, default=0, help="per-rank images (default 16 on CPU, 128 on CUDA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    emit(run(args.device, args.ranks, args.model, args.image_size, args.batch, args.rounds), args.out)


if __name__ == "__main__":
    sys.exit(main())
