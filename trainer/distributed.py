"""The process group from the torchrun environment (NCCL on CUDA, gloo on CPU), the collectives the training step
uses (a gather whose backward is exact, means and maxima over ranks) and the slow-step watch that names a late rank.

The store and the network check live in trainer/rendezvous.py, heartbeats and the launcher watch in
trainer/liveness.py, the torchrun wrapper the launchers run (`python -m trainer.distributed`) in trainer/agent.py.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer import liveness, rendezvous


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


_STORE: dist.Store | None = None  # this round's store: also carries each rank's heartbeat and host name
_PROGRESS = {"step": 0}  # the step this rank is at, published by the heartbeat thread (no store op per step)
_HEARTBEAT_STOP: threading.Event | None = None
_WATCH_STOP = threading.Event()


def set_progress(step: int) -> None:
    _PROGRESS["step"] = step


def init(world: WorldInfo, device_preference: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Starts the process group; world size 1 goes through the same code path (a group of one).

    A network set-up that cannot work stops this process with exit code 2 (a configuration error) before the
    process group starts (rendezvous.publish_host_and_check)."""
    global _STORE, _HEARTBEAT_STOP
    device = pick_device(device_preference, world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    _STORE, prefix = rendezvous.round_store(world, timeout)
    if world.world_size > 1:
        rendezvous.publish_host_and_check(world, backend, _STORE)
    dist.init_process_group(backend, store=_STORE, rank=world.rank,
                            world_size=world.world_size, timeout=timeout, **kwargs)
    if world.world_size > 1:  # the heartbeat's own connection: the main thread may be blocked in a collective
        _HEARTBEAT_STOP = threading.Event()
        beat_store = dist.PrefixStore(prefix, rendezvous.connect(world, timeout, client_only=True))
        liveness.start_heartbeat(beat_store, world.rank, _PROGRESS, _HEARTBEAT_STOP)
    if world.launcher_pid is not None:  # a torchrun worker: its launcher is its parent
        liveness.watch_parent(world.launcher_pid, _WATCH_STOP)
    return DistContext(world.rank, world.local_rank, world.world_size, device, backend, world.restart_count)


def shutdown() -> None:
    global _STORE
    _WATCH_STOP.set()
    if _HEARTBEAT_STOP is not None:
        _HEARTBEAT_STOP.set()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STORE = None
    _WAITED["s"] = 0.0


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
                            f"{liveness.progress_report(_STORE, world) or 'another rank is dead or hung'}")
            print(message, file=sys.stderr, flush=True)
        raise
    finally:
        shutdown()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_WAITED = {"s": 0.0}  # seconds this rank spent blocked in the loss's collectives since the last observe()


@contextlib.contextmanager
def _timed_wait():
    """Adds the time spent in a blocking collective to _WAITED (two clock reads; no sync of its own)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _WAITED["s"] += time.perf_counter() - start


class SlowStepWatch:
    """Names slow steps: a step over `factor` x the running median, and which rank the others waited for.

    observe() costs a deque append and a median of at most `window` numbers per step; no store operation or
    collective unless the step is slow. Then every rank that found it slow posts how long it waited in the loss's
    collectives (gloo's gather blocks the host; NCCL's does not, so on GPUs every wait reads ~0), and rank 0 reads
    those posts (waiting at most `report_wait_s` for them): the rank that waited least arrived last, late by the
    difference to the longest wait. Equal long waits mean the collective itself stalled (network?).
    """

    def __init__(self, world: WorldInfo | DistContext, factor: float = 4.0, min_steps: int = 10, window: int = 200,
                 report_wait_s: float = 2.0):
        self.world, self.factor, self.min_steps, self.report_wait_s = world, factor, min_steps, report_wait_s
        self._times: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, step: int, step_time_s: float) -> str | None:
        """One call per step on every rank; the warning line on rank 0 when the step was slow, else None."""
        waited, _WAITED["s"] = _WAITED["s"], 0.0
        median = statistics.median(self._times) if len(self._times) >= self.min_steps else None
        self._times.append(step_time_s)  # slow steps count too: a lasting slow-down stops being news
        if median is None or step_time_s <= self.factor * median:
            return None
        head = f"step {step} took {step_time_s:.1f} s, {step_time_s / median:.0f}x the median {median:.2f} s"
        if self.world.world_size == 1 or _STORE is None:
            return head if self.world.is_main else None
        try:
            return self._late_ranks(step, step_time_s - median, waited, head)
        except Exception as err:  # noqa: BLE001 - a report must never end the run
            return f"{head} (no per-rank report: {type(err).__name__}: {err})" if self.world.is_main else None

    def _late_ranks(self, step: int, excess: float, waited: float, head: str) -> str | None:
        _STORE.set(f"slow/{step}/{self.world.rank}", f"{waited:.3f}")
        if not self.world.is_main:
            return None
        keys = [f"slow/{step}/{r}" for r in range(self.world.world_size)]
        with contextlib.suppress(Exception):  # a rank that found the step normal (or is gone) posts nothing
            _STORE.wait(keys, datetime.timedelta(seconds=self.report_wait_s))
        waits = {r: float(_STORE.get(k)) for r, k in enumerate(keys) if _STORE.check([k])}
        longest = max(waits.values())
        late = sorted(((longest - w, r) for r, w in waits.items() if longest - w > 0.5 * excess), reverse=True)
        silent = [r for r in range(self.world.world_size) if r not in waits]
        if late:
            tail = ", ".join(f"rank {r} on {liveness.host_of(_STORE, r)} was late by {lag:.1f} s" for lag, r in late)
        elif longest > 0.5 * excess:
            tail = f"no rank was late: every rank waited {longest:.1f} s in a collective that stalled (network?)"
        else:
            tail = ("no rank waited in the loss's collectives: the time went to every rank's data or I/O, or to "
                    "DDP's gradient all-reduce (network?) or an asynchronous NCCL collective")
        if silent:
            tail += f"; no report from rank {', '.join(map(str, silent))}"
        return f"{head}: {tail}"


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradients over ranks and returns this rank's slice.

    Why not torch's: in torch 2.14 torch.distributed.nn.functional.all_gather computes the same gradient (checked
    on 2 gloo ranks) but is deprecated (each call warns FutureWarning, pointing to
    _functional_collectives.all_gather_single) and raises under torch.compile. That replacement is asynchronous: it
    returns an AsyncCollectiveTensor that blocks at its first use, not in the call, so the time a rank waits for the
    others could not be timed here (_timed_wait), and SlowStepWatch names the late rank from those waits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        with _timed_wait():
            dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        with _timed_wait():
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


if __name__ == "__main__":  # the launchers' torchrun (see trainer/agent.py)
    from trainer.agent import run_agent

    sys.exit(run_agent(sys.argv[1:]))
