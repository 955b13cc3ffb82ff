"""Communication: all_gather of the embeddings and all_reduce of ResNet-50's gradient size, per backend.

    torchrun --nproc_per_node=2 -m benchmarks.comm [--backend gloo|nccl] [--quick]
    python -m benchmarks.comm --spawn 2          (starts the 2 gloo processes itself)

Reports time per call and algorithm bandwidth (bytes moved by one rank / time) for each size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.common import emit, environment, free_port, sync

RESNET50_PARAMS = 25_557_032


def _time(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def measure(device: torch.device, quick: bool) -> dict:
    world = dist.get_world_size()
    rows = []
    for global_batch in ([256, 4096] if quick else [256, 1024, 4096, 8192]):
        local = torch.randn(2 * global_batch // world, 128, device=device)
        parts = [torch.empty_like(local) for _ in range(world)]
        seconds = _time(lambda: dist.all_gather(parts, local), device, 3 if quick else 10)
        rows.append({"op": "all_gather_embeddings", "global_batch": global_batch, "bytes_per_rank": local.nbytes,
                     "s": seconds, "algbw_gb_s": local.nbytes * world / seconds / 1e9})
    grads = torch.randn(RESNET50_PARAMS, device=device)
    seconds = _time(lambda: dist.all_reduce(grads), device, 2 if quick else 5)
    rows.append({"op": "all_reduce_resnet50_grads", "bytes_per_rank": grads.nbytes, "s": seconds,
                 "algbw_gb_s": grads.nbytes / seconds / 1e9})
    return {"backend": dist.get_backend(), "world_size": world, "rows": rows}


def run(quick: bool = True, world_size: int = 2) -> dict:
    """Spawns `world_size` gloo processes on this machine and returns rank 0's report."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size),
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "benchmarks.comm", "--backend", "gloo"] + (["--quick"] if quick else [])
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              text=True) for r in range(world_size)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"benchmarks.comm workers failed: {[p.returncode for p in procs]}")
    import json
    return json.loads(outputs[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spawn", type=int, default=0, help="start this many local gloo processes")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.spawn:
        emit(run(args.quick, args.spawn), args.out)
        return
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    rank = int(os.environ.get("RANK", 0))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        result = measure(device, args.quick)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        emit({"benchmark": "comm", "environment": environment(), "config": vars(args), "results": result}, args.out)


if __name__ == "__main__":
    main()
