"""Process group from the torchrun environment (NCCL on CUDA, gloo on CPU), and a gather whose backward is exact."""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    """What torchrun (or a plain `python -m`) tells this process about the job."""

    rank: int
    local_rank: int
    world_size: int
    restart_count: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> WorldInfo:
    """Reads RANK / LOCAL_RANK / WORLD_SIZE; a plain `python -m trainer.main` is rank 0 of 1."""
    env = os.environ
    return WorldInfo(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                     world_size=int(env.get("WORLD_SIZE", 1)),
                     restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _store(world: WorldInfo, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, under a prefix unique to this restart round.

    torchrun keeps one TCP store across restart rounds (its agent's store, shared with the workers), so the
    keys of a dead round are still there; a restarted gloo group would read them and try to connect to the
    dead worker. A prefix per TORCHELASTIC_RESTART_COUNT gives every round fresh keys.
    """
    if world.world_size == 1:
        return dist.HashStore()  # plain single process: nothing to rendezvous with
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(addr, port, world.world_size, is_master=world.rank == 0 and not agent_hosts_store,
                          timeout=timeout, wait_for_workers=False, multi_tenant=True)
    return dist.PrefixStore(f"simclr/round{world.restart_count}/", store)


def init(world: WorldInfo, device_preference: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Starts the process group; world size 1 goes through the same code path (a group of one)."""
    device = pick_device(device_preference, world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=_store(world, timeout), rank=world.rank,
                            world_size=world.world_size, timeout=timeout, **kwargs)
    return DistContext(world.rank, world.local_rank, world.world_size, device, backend, world.restart_count)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(world: WorldInfo, device_preference: str = "auto", timeout_s: int = 1800):
    """Process group for the body; destroyed on exit and on error (an error names the failing rank)."""
    ctx = init(world, device_preference, timeout_s)
    try:
        yield ctx
    except BaseException as err:
        if not isinstance(err, (KeyboardInterrupt, SystemExit)):
            print(f"[rank {world.rank}] failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    finally:
        shutdown()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on this rank's rows
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each of W ranks -> [W*n, ...] in rank order, differentiable; identity when W == 1."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (in place on a copy); identity for one process."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x
