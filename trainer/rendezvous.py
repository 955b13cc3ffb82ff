"""This round's store for the process group: torchrun's agent store (with a round number every rank agrees on) or
one hosted by rank 0, and the check, before the group starts, that gloo can connect the nodes at all."""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import sys
import time
import uuid
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from trainer.distributed import WorldInfo


def connect(world: WorldInfo, timeout: datetime.timedelta, client_only: bool = False) -> dist.Store:
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


def agreed_round(store: dist.Store, world: WorldInfo, timeout: datetime.timedelta) -> int:
    """A round number every rank of this worker group agrees on, from torchrun's shared agent store.

    torchrun keeps that store for the whole job, so the keys of a dead round are still there and a restarted
    gloo group would read them and connect to a dead worker: every round needs fresh keys. The agents' restart
    counts cannot name the round: each agent counts its own restarts only (after a crash on node B, node B's
    workers have TORCHELASTIC_RESTART_COUNT=1 and node A's 0). So rank 0 (one per round) draws the next number
    from a counter and hands it to every other rank, which asks with a token no earlier round used; rank 0
    answers every token it sees (a stale one from a dead round too, harmlessly) until all ranks confirmed.
    """
    if world.rank == 0:
        return _hand_out_round(store, world, timeout)
    token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    store.set(f"simclr/ask/{world.rank}", token)
    store.wait([f"simclr/answer/{token}"], timeout)
    number = int(store.get(f"simclr/answer/{token}"))
    store.add(f"simclr/round{number}/joined", 1)
    return number


def _hand_out_round(store: dist.Store, world: WorldInfo, timeout: datetime.timedelta) -> int:
    """Rank 0's side of agreed_round: draws the number and answers the other ranks' tokens until all joined."""
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


def round_store(world: WorldInfo, timeout: datetime.timedelta) -> tuple[dist.Store, str]:
    """This round's store and the key prefix that makes its keys fresh (see agreed_round).

    Without torchrun's shared store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or a plain launch) rank 0 hosts a
    new store every round, on a port torchrun draws per round: its keys are fresh as they are.
    """
    store = connect(world, timeout)
    if world.world_size == 1 or not _agent_store():
        return store, "simclr/"
    prefix = f"simclr/round{agreed_round(store, world, timeout)}/"
    return dist.PrefixStore(prefix, store), prefix


# --- the network check -------------------------------------------------------------------------------------------

def _spans_nodes(world: WorldInfo) -> bool:
    """More ranks than this node's agent runs (torchrun sets LOCAL_WORLD_SIZE; a plain launch is one node)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
    return world.world_size > local


def host_and_address() -> str:
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


def publish_host_and_check(world: WorldInfo, backend: str, store: dist.Store) -> None:
    """Publishes this rank's host (it names the node in reports) and stops the process with exit code 2 (a
    configuration error) when check_network finds a set-up that cannot work, one line per node."""
    store.set(f"host/{world.rank}", host_and_address())
    problem = check_network(world, backend, store)
    if problem is None:
        return
    if world.local_rank == 0:  # one line per node
        print(f"config error: [rank {world.rank}] {problem}", file=sys.stderr, flush=True)
    store.add("network_checked", 1)
    deadline = time.monotonic() + 10  # rank 0 may host the store: let the others read it first
    while world.rank == 0 and store.add("network_checked", 0) < world.world_size and time.monotonic() < deadline:
        time.sleep(0.05)
    raise SystemExit(2)
