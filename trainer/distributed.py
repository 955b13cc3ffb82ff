"""Process group from the torchrun environment (NCCL on CUDA, gloo on CPU), and a gather whose backward is exact."""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
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
    launcher_pid: int | None = None  # torchrun's agent (this worker's parent), read at start-up

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> WorldInfo:
    """Reads RANK / LOCAL_RANK / WORLD_SIZE; a plain `python -m trainer.main` is rank 0 of 1."""
    env = os.environ
    return WorldInfo(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                     world_size=int(env.get("WORLD_SIZE", 1)),
                     restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
                     launcher_pid=os.getppid() if "TORCHELASTIC_RUN_ID" in env else None)


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


def _store(world: WorldInfo, timeout: datetime.timedelta, client_only: bool = False) -> dist.Store:
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
    host = world.rank == 0 and not agent_hosts_store and not client_only
    store = dist.TCPStore(addr, port, world.world_size, is_master=host,
                          timeout=timeout, wait_for_workers=False, multi_tenant=True)
    return dist.PrefixStore(f"simclr/round{world.restart_count}/", store)


_STORE: dist.Store | None = None  # this round's store: also carries each rank's heartbeat
_PROGRESS = {"step": 0}  # the step this rank is at, published by the heartbeat thread (no store op per step)
_HEARTBEAT_S = 2.0


def set_progress(step: int) -> None:
    _PROGRESS["step"] = step


def _heartbeat_loop(store: dist.Store, rank_: int, stop: threading.Event) -> None:
    """Every few seconds: 'time step' under heartbeat/<rank>. A stopped or dead process stops beating."""
    while not stop.wait(_HEARTBEAT_S):
        try:
            store.set(f"heartbeat/{rank_}", f"{time.time():.3f} {_PROGRESS['step']}")
        except Exception:  # noqa: BLE001 - the store may go away at shutdown
            return


def progress_report(world: WorldInfo) -> str:
    """Which ranks still beat and where they are, e.g. 'rank 1 silent for 14 s (last at step 55): dead or hung'."""
    if _STORE is None or world.world_size == 1:
        return ""
    now, parts, silent = time.time(), [], []
    try:
        for r in range(world.world_size):
            key = f"heartbeat/{r}"
            if not _STORE.check([key]):
                parts.append(f"rank {r}: no heartbeat yet")
                silent.append(r)
                continue
            stamp, step = _STORE.get(key).decode().split()
            age = now - float(stamp)
            parts.append(f"rank {r}: step {step}, last heartbeat {age:.0f} s ago")
            if age > 3 * _HEARTBEAT_S:
                silent.append(r)
    except Exception:  # noqa: BLE001 - the store itself may be gone with the failed job
        return ""
    verdict = f"; silent (dead or hung): rank {', '.join(map(str, silent))}" if silent else ""
    return "; ".join(parts) + verdict


def init(world: WorldInfo, device_preference: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Starts the process group; world size 1 goes through the same code path (a group of one)."""
    device = pick_device(device_preference, world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    global _STORE
    _STORE = _store(world, timeout)
    dist.init_process_group(backend, store=_STORE, rank=world.rank,
                            world_size=world.world_size, timeout=timeout, **kwargs)
    if world.world_size > 1:
        _start_heartbeat(world, timeout)
    if world.launcher_pid is not None:  # a torchrun worker: its launcher is its parent
        watch_parent(world.launcher_pid)
    return DistContext(world.rank, world.local_rank, world.world_size, device, backend, world.restart_count)


_HEARTBEAT_STOP: threading.Event | None = None


def _start_heartbeat(world: WorldInfo, timeout: datetime.timedelta) -> None:
    """A daemon thread with its own store connection (the main thread may be blocked in a collective)."""
    global _HEARTBEAT_STOP
    store = _store(world, timeout, client_only=True)
    _HEARTBEAT_STOP = threading.Event()
    threading.Thread(target=_heartbeat_loop, args=(store, world.rank, _HEARTBEAT_STOP), daemon=True,
                     name="heartbeat").start()


_WATCH_STOP = threading.Event()


def watch_parent(parent: int, poll_s: float = _HEARTBEAT_S) -> threading.Thread:
    """Stops this process the way a preemption does (SIGTERM to itself: every rank agrees to stop, rank 0
    checkpoints, exit 143) once its parent `parent` is gone, e.g. a torchrun agent killed with SIGKILL: its
    workers would otherwise train on as orphans, writing checkpoints beside the restarted job's. Only for
    workers a launcher started; a plain `python -m` run may outlive its shell (nohup) on purpose."""
    _WATCH_STOP.clear()

    def loop() -> None:
        while not _WATCH_STOP.wait(poll_s):
            if os.getppid() != parent:
                print(f"[pid {os.getpid()}] the launcher (pid {parent}) is gone: stopping", file=sys.stderr,
                      flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=loop, daemon=True, name="parent-watch")
    thread.start()
    return thread


def shutdown() -> None:
    global _STORE
    _WATCH_STOP.set()
    if _HEARTBEAT_STOP is not None:
        _HEARTBEAT_STOP.set()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STORE = None


@contextlib.contextmanager
def process_group(world: WorldInfo, device_preference: str = "auto", timeout_s: int = 1800):
    """Process group for the body; destroyed on exit and on error (an error names the failing rank)."""
    ctx = init(world, device_preference, timeout_s)
    try:
        yield ctx
    except BaseException as err:
        if not isinstance(err, (KeyboardInterrupt, SystemExit)):
            message = f"[rank {world.rank}] failed: {type(err).__name__}: {err}"
            if "timed out" in str(err).lower() or "timeout" in str(err).lower():
                message += (f"\n[rank {world.rank}] a collective did not complete within dist_timeout_s={timeout_s}: "
                            f"{progress_report(world) or 'another rank is dead or hung'}")
            print(message, file=sys.stderr, flush=True)
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
