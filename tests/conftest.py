"""Shared test helpers: run a function on N gloo processes on this machine and collect what each returns."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, queue, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        buffer = io.BytesIO()  # tensors as bytes: shared-memory handles die with this process
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, buffer.getvalue(), None))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args, timeout_s: float = 120.0) -> list:
    """Runs fn(rank, world_size, *args) in world_size forked gloo processes; returns their results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, value, err = queue.get(timeout=timeout_s)
            results[rank] = torch.load(io.BytesIO(value), weights_only=False) if value is not None else None
            if err:
                errors.append(f"rank {rank}:\n{err}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results


@pytest.fixture
def distributed_run():
    return run_distributed


@pytest.fixture
def unused_port() -> int:
    """A TCP port that nothing listens on at 127.0.0.1 when the test starts (for a launcher's rendezvous)."""
    return free_port()
