"""Cost of GlobalBatchNorm against nn.BatchNorm2d (and nn.SyncBatchNorm on CUDA): forward + backward of a ResNet.

    python -m benchmarks.global_bn [--device cpu|cuda|cuda:N] [--model resnet18] [--image-size 32] [--batch 64]
    torchrun --nproc_per_node=8 -m benchmarks.global_bn --device cuda --model resnet50 --image-size 224 --batch 256

One process: GlobalBatchNorm's multi-rank code path (fp32 statistics, fused reductions, its all-reduce over a
process group of one) against nn.BatchNorm2d, i.e. the arithmetic's overhead without the network's. Under
torchrun: per-rank nn.BatchNorm2d, GlobalBatchNorm over all ranks and, on CUDA, nn.SyncBatchNorm, each a full
training forward + backward with DDP, rank 0 reporting. Also one BN layer alone (64 channels, 32x32 maps), and
in one process that layer's arithmetic without its two collectives.
Each case is timed in alternating rounds (benchmarks.common.interleaved_rates) so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.common import add_device_argument, emit, environment, interleaved_rates, resolve_device
from trainer import global_bn
from trainer.config import ModelConfig
from trainer.model import build_model


@contextlib.contextmanager
def multi_rank_path():
    """In a process group of one, GlobalBatchNorm would take nn.BatchNorm's path: make it take the multi-rank one
    (its all-reduce then runs over the group of one)."""
    size = global_bn._group_size
    global_bn._group_size = lambda group: max(2, size(group))
    try:
        yield
    finally:
        global_bn._group_size = size


def without_collective(fn):
    """fn with GlobalBatchNorm's all-reduce replaced by the identity: its arithmetic alone (one process only)."""
    def run():
        reduce = global_bn._all_reduce_sum
        global_bn._all_reduce_sum = lambda tensor, group: tensor
        try:
            fn()
        finally:
            global_bn._all_reduce_sum = reduce
    return run


def training_pass(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None):
    def run():
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return run


def run(device: str = "auto", model_name: str = "resnet18", image_size: int = 32, batch: int = 64,
        rounds: int = 5, amp: str = "off", channels_last: bool = False) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                **({} if world > 1 else dict(init_method="tcp://127.0.0.1:0", rank=0, world_size=1)))
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, image_size, image_size, device=dev).contiguous(memory_format=memory_format)
    layer_x = torch.randn(batch, 64, 32, 32, device=dev).contiguous(memory_format=memory_format)

    impls = {"batchnorm": lambda m: m, "global": global_bn.convert_global_batchnorm}
    if dev.type == "cuda" and world > 1:
        impls["sync"] = nn.SyncBatchNorm.convert_sync_batchnorm
    cases = {}
    for name, convert in impls.items():
        torch.manual_seed(0)
        model = convert(build_model(ModelConfig(base_model=model_name, small_stem=image_size <= 64)))
        model = model.to(dev, memory_format=memory_format)
        cases[f"model_{name}"] = training_pass(DDP(model) if world > 1 else model, x, amp_dtype)
        layer = convert(nn.BatchNorm2d(64)).to(dev)
        cases[f"layer_{name}"] = training_pass(layer, layer_x.requires_grad_(), amp_dtype)
        if name == "global" and world == 1:
            cases["layer_global_arithmetic"] = without_collective(cases["layer_global"])
    with multi_rank_path() if world == 1 else contextlib.nullcontext():
        models = interleaved_rates({k: v for k, v in cases.items() if k.startswith("model_")}, batch, dev,
                                   rounds=rounds)
        layers = interleaved_rates({k: v for k, v in cases.items() if k.startswith("layer_")}, batch, dev,
                                   rounds=rounds)
    if owns_group:
        dist.destroy_process_group()
    results = {"model_images_per_s": models, "layer_images_per_s": layers,
               "model_time_global_over_batchnorm": models["model_batchnorm"] / models["model_global"],
               "layer_time_global_over_batchnorm": layers["layer_batchnorm"] / layers["layer_global"]}
    if "layer_global_arithmetic" in layers:  # the rest is the collectives' fixed cost (two per layer per step)
        results["layer_time_global_arithmetic_over_batchnorm"] = (layers["layer_batchnorm"]
                                                                  / layers["layer_global_arithmetic"])
    if "model_sync" in models:
        results["model_time_global_over_sync"] = models["model_sync"] / models["model_global"]
        results["layer_time_global_over_sync"] = layers["layer_sync"] / layers["layer_global"]
    return {"benchmark": "global_bn", "environment": environment(),
            "config": {"device": str(dev), "world_size": world, "model": model_name, "image_size": image_size,
                       "batch_per_rank": batch, "amp": amp, "channels_last": channels_last,
                       "one_process": "GlobalBatchNorm's multi-rank path over a group of one" if world == 1 else None},
            "results": results}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="images per rank")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    report = run(args.device, args.model, args.image_size, args.batch, args.rounds, args.amp, args.channels_last)
    if int(os.environ.get("RANK", 0)) == 0:
        emit(report, args.out)


if __name__ == "__main__":
    main()
