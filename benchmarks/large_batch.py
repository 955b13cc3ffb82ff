"""Peak memory and step time of the cached (chunked) step vs the direct step, side by side in one process.

    python -m benchmarks.large_batch [--model resnet18] [--image-size 32] [--batch 128] [--chunk 32]
        [--device cpu|cuda|cuda:N]

On CUDA peak memory is torch.cuda.max_memory_allocated. On CPU it is the growth of the process's resident
set during one step (VmHWM after resetting it through /proc/self/clear_refs), with glibc's mmap threshold
fixed (mallopt) so that freed tensors go back to the system at once. Goal: cached peak <= 40% of direct at <= 1.35x
the step time.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from benchmarks.common import add_device_argument, emit, environment, resolve_device, sync
from trainer.cached_step import cached_train_step
from trainer.config import ModelConfig
from trainer.loss import NTXentLoss
from trainer.model import build_model
from trainer.optim import LARS, param_groups
from trainer.step import train_step


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _return_freed_memory_to_os() -> None:
    """glibc: serve allocations of 64 KiB and more by mmap (and unmap them on free), so RSS tracks live tensors."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536)


def peak_step_bytes(fn, device: torch.device) -> float:
    """Memory a call adds at its peak over what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident-set high-water mark
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) * 1024.0


def measure(base_model: str, image_size: int, batch: int, chunk: int, device: torch.device, rounds: int) -> dict:
    if device.type == "cpu":
        _return_freed_memory_to_os()
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_model=base_model, small_stem=True)).to(device)
    optimizer = LARS(param_groups(model, 1e-6), lr=0.01, weight_decay=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    x1, x2 = (torch.randn(batch, 3, image_size, image_size, device=device) for _ in range(2))
    steps = {"direct": functools.partial(train_step, model, NTXentLoss(0.2), optimizer, scaler, x1, x2, None),
             "cached": functools.partial(cached_train_step, model, NTXentLoss(0.2), optimizer, scaler, x1, x2, None,
                                         chunk_size=chunk)}
    for fn in steps.values():  # warm-up: allocator caches, optimizer state
        fn()
    times = {name: [] for name in steps}
    peaks = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            peaks[name].append(peak_step_bytes(fn, device))
            sync(device)
            times[name].append(time.perf_counter() - start)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    peak = {name: sorted(v)[len(v) // 2] for name, v in peaks.items()}
    return {"step_time_s": med, "peak_step_bytes": peak,
            "memory_ratio_cached_over_direct": peak["cached"] / max(peak["direct"], 1.0),
            "time_ratio_cached_over_direct": med["cached"] / med["direct"],
            "goal": "memory ratio <= 0.40 at time ratio <= 1.35"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128, help="images per step (two views each)")
    parser.add_argument("--chunk", type=int, default=32, help="views per chunk in the cached step")
    add_device_argument(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    result = measure(args.model, args.image_size, args.batch, args.chunk, device, args.rounds)
    emit({"benchmark": "large_batch", "environment": environment(), "config": vars(args), "results": result},
         args.out)


if __name__ == "__main__":
    main()
