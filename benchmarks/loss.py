"""NT-Xent time and peak memory per rank vs global batch (256..8192) and world size (1, 2, 8), against the
full 2N x 2N matrix that a naive implementation builds on every rank.

    python -m benchmarks.loss [--device cpu|cuda|cuda:N] [--dim 128] [--quick]

One rank's slice is computed on one device: its 2n local rows against 2N columns (the gathered embeddings are
simulated by a tensor of the right size, so the numbers are the loss's own, without communication).
Peak memory on CPU is counted from the autograd graph's saved tensors plus the outputs (the allocator has no
peak statistic there); on CUDA it is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import add_device_argument, emit, environment, resolve_device, sync
from trainer.loss import rank_logits


def rank_slice_loss(local: torch.Tensor, columns: torch.Tensor, offset: int, temperature: float) -> torch.Tensor:
    """trainer.loss's arithmetic for one rank, with the gathered columns given (no communication)."""
    logits, positives = rank_logits(F.normalize(local, dim=1), F.normalize(columns, dim=1), offset, temperature)
    return F.cross_entropy(logits, positives)


def full_matrix_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The naive version: every rank builds the whole 2N x 2N similarity matrix."""
    n2 = z.shape[0]
    z = F.normalize(z, dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    return F.cross_entropy(logits, (torch.arange(n2, device=z.device) + n2 // 2) % n2)


def _peak(fn, device) -> tuple[float, float]:
    """(seconds, peak bytes) of a forward + backward."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        return seconds, float(torch.cuda.max_memory_allocated(device) - base)
    return seconds, float(sum(saved.values()))


def measure(global_batch: int, world_size: int, dim: int, device: torch.device) -> dict:
    views = 2 * global_batch
    local_views = views // world_size
    g = torch.Generator(device=device).manual_seed(0)
    columns = torch.randn(views, dim, device=device, generator=g, requires_grad=True)
    local = torch.randn(local_views, dim, device=device, generator=g, requires_grad=True)
    seconds, peak = _peak(lambda: rank_slice_loss(local, columns, 0, 0.1), device)
    full_seconds, full_peak = _peak(lambda: full_matrix_loss(columns, 0.1), device)
    return {"global_batch": global_batch, "world_size": world_size, "slice_shape": [local_views, views],
            "slice_s": seconds, "slice_peak_bytes": peak, "full_s": full_seconds, "full_peak_bytes": full_peak,
            "logit_slice_bytes": local_views * views * 4, "memory_ratio_full_over_slice": full_peak / peak}


def run(device: str = "auto", quick: bool = False, dim: int = 128, batches: list[int] | None = None) -> dict:
    dev = resolve_device(device)
    batches = batches or ([256, 1024, 8192] if quick else [256, 1024, 4096, 8192])
    rows = [measure(b, w, dim, dev) for b in batches for w in (1, 2, 8)]
    return {"benchmark": "loss", "environment": environment(), "config": {"device": str(dev), "dim": dim},
            "results": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    emit(run(args.device, args.quick, args.dim), args.out)


if __name__ == "__main__":
    main()
