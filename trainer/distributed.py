"""Process group from the torchrun environment (NCCL on CUDA, gloo on CPU) with its store, health reports and
launch checks, a gather whose backward is exact, and the bounded-rejoin torchrun the launchers run."""
from __future__ import annotations

import collections
import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import statistics
import sys
import threading
import time
import uuid
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


def _connect(world: WorldInfo, timeout: datetime.timedelta, client_only: bool = False) -> dist.Store:
    """The job's TCP store: torchrun's agent store when it shares it, else one hosted by rank 0 for this round."""
    if world.world_size == 1:
        return dist.HashStore()  # plain single process: nothing to rendezvous with
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    host = world.rank == 0 and not _agent_store() and not client_only
    return dist.TCPStore(addr, port, world.world_size, is_master=host,
                         timeout=timeout, wait_for_workers=False, multi_tenant=True)


def _agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def _agreed_round(store: dist.Store, world: WorldInfo, timeout: datetime.timedelta) -> int:
    """A round number every rank of this worker group agrees on, from torchrun's shared agent store.

    torchrun keeps that store for the whole job, so the keys of a dead round are still there and a restarted
    gloo group would read them and connect to a dead worker: every round needs fresh keys. The agents' restart
    counts cannot name the round: each agent counts its own restarts only (after a crash on node B, node B's
    workers have TORCHELASTIC_RESTART_COUNT=1 and node A's 0). So rank 0 (one per round) draws the next number
    from a counter and hands it to every other rank, which asks with a token no earlier round used; rank 0
    answers every token it sees (a stale one from a dead round too, harmlessly) until all ranks confirmed.
    """
    if world.rank == 0:
        number = store.add("simclr/rounds", 1)
        joined = f"simclr/round{number}/joined"
        answered: set[bytes] = set()
        deadline = time.monotonic() + timeout.total_seconds()
        while store.add(joined, 0) < world.world_size - 1:
            for r in range(1, world.world_size):
                key = f"simclr/ask/{r}"
                if store.check([key]):
                    token = store.get(key)
                    if token not in answered:
                        store.set(f"simclr/answer/{token.decode()}", str(number))
                        answered.add(token)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0: only {store.add(joined, 0)} of the other {world.world_size - 1} "
                                   f"ranks joined round {number} within {timeout.total_seconds():.0f} s")
            time.sleep(0.02)
        return number
    token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    store.set(f"simclr/ask/{world.rank}", token)
    store.wait([f"simclr/answer/{token}"], timeout)
    number = int(store.get(f"simclr/answer/{token}"))
    store.add(f"simclr/round{number}/joined", 1)
    return number


def _store(world: WorldInfo, timeout: datetime.timedelta) -> tuple[dist.Store, str]:
    """This round's store and the key prefix that makes its keys fresh (see _agreed_round).

    Without torchrun's shared store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or a plain launch) rank 0 hosts a
    new store every round, on a port torchrun draws per round: its keys are fresh as they are.
    """
    store = _connect(world, timeout)
    if world.world_size == 1 or not _agent_store():
        return store, "simclr/"
    prefix = f"simclr/round{_agreed_round(store, world, timeout)}/"
    return dist.PrefixStore(prefix, store), prefix


_STORE: dist.Store | None = None  # this round's store: also carries each rank's heartbeat and host name
_PREFIX = "simclr/"  # this round's key prefix in the job's store (the heartbeat thread's connection uses it too)
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


def _host_of(store: dist.Store, rank_: int) -> str:
    """The host name rank `rank_` published at start-up ('?' when it did not)."""
    key = f"host/{rank_}"
    return store.get(key).decode().split()[0] if store.check([key]) else "?"


def progress_report(world: WorldInfo) -> str:
    """Which ranks still beat and where they are, e.g. 'rank 1 on node-b: step 55, last heartbeat 14 s ago;
    silent (dead or hung): rank 1 on node-b'."""
    if _STORE is None or world.world_size == 1:
        return ""
    parts, silent = [], []
    try:
        for r in range(world.world_size):
            key, who = f"heartbeat/{r}", f"rank {r} on {_host_of(_STORE, r)}"
            if not _STORE.check([key]):
                parts.append(f"{who}: no heartbeat yet")
                silent.append(who)
                continue
            stamp, step = _STORE.get(key).decode().split()
            age = time.time() - float(stamp)  # the clock read after the store read (which can block)
            parts.append(f"{who}: step {step}, last heartbeat {age:.0f} s ago")
            if age > 3 * _HEARTBEAT_S:
                silent.append(who)
    except Exception:  # noqa: BLE001 - the store itself may be gone with the failed job
        return ""
    verdict = f"; silent (dead or hung): {', '.join(silent)}" if silent else ""
    return "; ".join(parts) + verdict


def _spans_nodes(world: WorldInfo) -> bool:
    """More ranks than this node's agent runs (torchrun sets LOCAL_WORLD_SIZE; a plain launch is one node)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
    return world.world_size > local


def _host_and_address() -> str:
    """'name address': this host's name and the address gloo would take for it (the first it resolves to)."""
    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        infos = []
    return f"{host} {infos[0][4][0] if infos else 'nothing'}"


def _unreachable(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return True  # 'nothing': the name does not resolve


def check_network(world: WorldInfo, backend: str, store: dist.Store) -> str | None:
    """Why gloo could not connect the nodes of this job, before the process group tries for minutes; None if fine.

    Every rank has published 'host address' under host/<rank>. Without GLOO_SOCKET_IFNAME gloo binds to the
    address the host name resolves to; where that is a loopback address (Debian's hosts file maps the name to
    127.0.1.1) and the ranks run on several hosts, the other hosts' connections are refused: one node fails in
    seconds, the others after 5x dist_timeout_s. Every rank reads the same keys and so decides alike. NCCL
    picks a non-loopback interface by itself, but a CUDA run also has a gloo group (the stop flag in
    trainer/preemption.py): `backend` is checked the same way."""
    del backend  # gloo either way (see above); kept for callers that know only the main backend
    if not _spans_nodes(world) or os.environ.get("GLOO_SOCKET_IFNAME"):
        return None
    keys = [f"host/{r}" for r in range(world.world_size)]
    store.wait(keys)
    hosts = [store.get(key).decode().split(maxsplit=1) for key in keys]
    if len({name for name, _ in hosts}) < 2:
        return None  # every rank on this host: loopback reaches them all
    bad = sorted({(name, addr) for name, addr in hosts if _unreachable(addr)})
    if not bad:
        return None
    names = ", ".join(f"host name '{name}' resolves to {addr}" for name, addr in bad)
    return (f"{names}, not to an address the other nodes can reach, and GLOO_SOCKET_IFNAME is not set: gloo "
            f"would fail with 'Connection refused'. Set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME for GPUs) on "
            f"every node to the network interface that connects the nodes (launch/multi_node.sh and "
            f"launch/slurm.sbatch: SOCKET_IFNAME=eth0, say), or map each host name to that interface's address "
            f"in /etc/hosts")


def init(world: WorldInfo, device_preference: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Starts the process group; world size 1 goes through the same code path (a group of one).

    A network set-up that cannot work stops this process with exit code 2 (a configuration error) before the
    process group starts."""
    device = pick_device(device_preference, world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    global _STORE, _PREFIX
    _STORE, _PREFIX = _store(world, timeout)
    if world.world_size > 1:
        _STORE.set(f"host/{world.rank}", _host_and_address())  # names the node in reports
        problem = check_network(world, backend, _STORE)
        if problem is not None:
            if world.local_rank == 0:  # one line per node
                print(f"config error: [rank {world.rank}] {problem}", file=sys.stderr, flush=True)
            _STORE.add("network_checked", 1)
            deadline = time.monotonic() + 10  # rank 0 may host the store: let the others read it first
            while world.rank == 0 and _STORE.add("network_checked", 0) < world.world_size and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            raise SystemExit(2)
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
    store = dist.PrefixStore(_PREFIX, _connect(world, timeout, client_only=True))
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
                            f"{progress_report(world) or 'another rank is dead or hung'}")
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
            tail = ", ".join(f"rank {r} on {_host_of(_STORE, r)} was late by {lag:.1f} s" for lag, r in late)
        elif longest > 0.5 * excess:
            tail = f"no rank was late: every rank waited {longest:.1f} s in a collective that stalled (network?)"
        else:
            tail = ("no rank waited in the loss's collectives: the time went to every rank's data or I/O, or to "
                    "DDP's gradient all-reduce (network?) or an asynchronous NCCL collective")
        if silent:
            tail += f"; no report from rank {', '.join(map(str, silent))}"
        return f"{head}: {tail}"


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradients over ranks and returns this rank's slice."""

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


# --- the launchers' torchrun -----------------------------------------------------------------------------------

def bound_rejoin(rejoin_timeout_s: float) -> None:
    """Makes torchrun's c10d rendezvous wait at most `rejoin_timeout_s` for the nodes of the round that ended.

    After a failure every agent rejoins, and torchrun waits for the missing nodes as long as for the first join
    (join_timeout, 600 s by default), then ends with a bare RendezvousTimeoutError. A node that was in the last
    round and has not come back within a minute is lost (its agent is dead): the job ends sooner, naming it. The
    first join keeps join_timeout (nodes started by hand may come minutes apart)."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    original = rdzv.DynamicRendezvousHandler.next_rendezvous
    if getattr(original, "bounded_rejoin", None) is not None:
        original = original.bounded_rejoin

    def next_rendezvous(self):
        state = self._state_holder.state
        before = sorted(state.participants) if state.complete else []  # the nodes of the round that ended
        if not before:
            return original(self)
        first_join = self._settings.timeout._join
        self._settings.timeout._join = datetime.timedelta(seconds=rejoin_timeout_s)
        try:
            return original(self)
        except RendezvousTimeoutError as err:
            now = self._state_holder.state
            back = set(now.participants) | set(now.wait_list)
            lost = [node for node in before if node not in back and node != self._this_node]
            names = ", ".join(f"{node.addr} (torchrun pid {node.pid})" for node in lost) or "a node"
            raise RendezvousTimeoutError(
                f"node lost: {names} of the last round did not rejoin within {rejoin_timeout_s:.0f} s after the "
                f"workers stopped (its torchrun is dead or cannot reach the rendezvous): ending the job. Restart "
                f"it on every node to resume from the newest checkpoint") from err
        finally:
            self._settings.timeout._join = first_join

    next_rendezvous.bounded_rejoin = original
    rdzv.DynamicRendezvousHandler.next_rendezvous = next_rendezvous


def run_agent(argv: list[str]) -> int:
    """`python -m trainer.distributed [--rejoin-timeout S] TORCHRUN_ARGS...`: torchrun with bound_rejoin(S)."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import main as torchrun_main

    rejoin_s = 60.0
    if argv and argv[0].startswith("--rejoin-timeout"):
        value = argv[0].split("=", 1)[1] if "=" in argv[0] else argv[1]
        argv = argv[1:] if "=" in argv[0] else argv[2:]
        rejoin_s = float(value)
    bound_rejoin(rejoin_s)
    try:
        torchrun_main(argv)
    except RendezvousTimeoutError as err:
        if not str(err).startswith("node lost"):
            raise
        print(f"[{socket.gethostname()}] {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_agent(sys.argv[1:]))
