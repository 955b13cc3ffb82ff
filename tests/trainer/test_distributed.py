"""trainer.distributed without torchrun: the agreed round id, the loopback check, the heartbeat report, the slow-step
watch (fed times, and on two gloo ranks where one is late) and the bounded rejoin."""
from __future__ import annotations

import datetime
import re
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.conftest import run_distributed
from trainer import distributed
from trainer.distributed import SlowStepWatch, WorldInfo


def world(rank: int = 0, size: int = 1, restarts: int = 0) -> WorldInfo:
    return WorldInfo(rank=rank, local_rank=0, world_size=size, restart_count=restarts)


# --- the round id -----------------------------------------------------------------------------------------------

def test_ranks_agree_on_a_fresh_round_whatever_their_restart_counts():
    """torchrun's agents count restarts per node: the ranks of one round see different counts. They must still
    use the same, fresh key prefix, also when a dead round left its keys behind."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    timeout = datetime.timedelta(seconds=30)
    server.set("simclr/ask/1", "stale-token-of-a-dead-round")  # asked, never answered: its rank died
    server.set("simclr/ask/2", "another-stale-token")

    def one_round(restart_counts):
        got, errors = {}, []

        def rank_main(r):
            try:
                store = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
                got[r] = distributed._agreed_round(store, world(r, 3, restart_counts[r]), timeout)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in (2, 1, 0)]  # rank 0 comes last
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(got) == 3, errors
        return got

    assert one_round([0, 0, 0]) == {0: 1, 1: 1, 2: 1}
    assert one_round([0, 1, 0]) == {0: 2, 1: 2, 2: 2}  # node B restarted, node A did not
    assert one_round([1, 1, 0]) == {0: 3, 1: 3, 2: 3}


def test_rank_zero_gives_up_when_ranks_do_not_join_in_time():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    with pytest.raises(TimeoutError, match=r"only 0 of the other 2 ranks joined round 1 within 1 s"):
        distributed._agreed_round(server, world(0, 3), datetime.timedelta(seconds=1))


# --- the loopback check -----------------------------------------------------------------------------------------

def host_store(*hosts: str) -> dist.Store:
    store = dist.HashStore()
    for r, host in enumerate(hosts):
        store.set(f"host/{r}", host)
    return store


def test_loopback_host_name_on_several_hosts_names_the_interface_variables(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    store = host_store("node-a 10.0.0.1", "node-b 127.0.1.1")
    problem = distributed.check_network(world(0, 2), "gloo", store)
    assert problem is not None
    assert "host name 'node-b' resolves to 127.0.1.1" in problem and "node-a" not in problem
    assert "GLOO_SOCKET_IFNAME" in problem and "NCCL_SOCKET_IFNAME" in problem and "SOCKET_IFNAME=eth0" in problem
    unresolved = distributed.check_network(world(1, 2), "gloo", host_store("node-a nothing", "node-b 10.0.0.2"))
    assert "host name 'node-a' resolves to nothing" in unresolved
    # a CUDA run (NCCL) still has a gloo group for its stop flag: the same check
    assert distributed.check_network(world(0, 2), "nccl", store) == problem


@pytest.mark.parametrize("case", ["one host", "interface set", "one node"])
def test_loopback_host_name_is_fine_where_it_cannot_matter(monkeypatch, case):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2" if case == "one node" else "1")
    hosts = ("vm 127.0.1.1", "vm 127.0.1.1") if case == "one host" else ("a 127.0.1.1", "b 127.0.1.1")
    if case == "interface set":
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    assert distributed.check_network(world(0, 2), "gloo", host_store(*hosts)) is None


def test_host_and_address_is_this_hosts_name():
    import socket
    name, addr = distributed._host_and_address().split()
    assert name == socket.gethostname() and addr


# --- the heartbeat report ---------------------------------------------------------------------------------------

class SlowStore:
    """A store whose reads take `delay_s` (a busy or far store); heartbeats stamped when the read completes."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def check(self, keys):
        return True

    def get(self, key):
        time.sleep(self.delay_s)
        if key.startswith("host/"):
            return b"node-x 10.0.0.9"
        return f"{time.time():.3f} 7".encode()


def test_heartbeat_age_is_read_after_the_store_read(monkeypatch):
    """Bug: the report read the clock before store reads that can block, printing 'last heartbeat -12 s ago'."""
    monkeypatch.setattr(distributed, "_STORE", SlowStore(1.2))
    report = distributed.progress_report(world(0, 2))
    ages = [int(a) for a in re.findall(r"last heartbeat (-?\d+) s ago", report)]
    assert len(ages) == 2 and all(0 <= a <= 1 for a in ages), report
    assert "rank 1 on node-x: step 7" in report


# --- the slow-step watch ----------------------------------------------------------------------------------------

def test_slow_step_watch_from_fed_times():
    watch = SlowStepWatch(world(), factor=4.0, min_steps=10)
    times = [0.10, 0.12, 0.09, 0.11, 0.10, 0.10, 0.13, 0.10, 0.11, 0.09]
    assert [watch.observe(s, t) for s, t in enumerate(times)] == [None] * 10
    assert watch.observe(10, 0.40) is None  # 4x the median 0.10 exactly: not over
    assert watch.observe(11, 2.5) == "step 11 took 2.5 s, 25x the median 0.10 s"
    assert watch.observe(12, 0.1) is None


def test_slow_step_watch_waits_for_min_steps_and_follows_a_lasting_change():
    watch = SlowStepWatch(world(), factor=4.0, min_steps=10, window=20)
    assert all(watch.observe(s, 50.0 if s == 3 else 0.1) is None for s in range(10))  # too early to judge
    slowed = [watch.observe(s, 1.0) for s in range(10, 40)]  # the run got 10x slower for good
    assert slowed[0] is not None and slowed[-1] is None  # warned at first, then the median caught up


def test_slow_step_watch_names_the_rank_the_others_waited_for():
    results = run_distributed(_late_rank_steps, 2, timeout_s=120)
    rank0, rank1 = results
    assert rank1 == []  # only rank 0 reports
    [(step, message)] = rank0
    assert step == 12
    lag = float(re.search(r"rank 1 on \S+ was late by ([\d.]+) s", message).group(1))
    assert 1.2 <= lag <= 2.5, message
    assert message.startswith("step 12 took ")


def test_slow_step_watch_tells_a_stalled_collective_from_a_late_rank():
    stalled, everyone_slow = run_distributed(_stalled_steps, 2, timeout_s=120)[0]
    assert re.search(r"no rank was late: every rank waited 1\.\d s in a collective that stalled \(network\?\)",
                     stalled), stalled
    assert "no rank waited in the loss's collectives" in everyone_slow


def _watch_with_store(rank, size):
    import os
    store = dist.FileStore(os.environ["SLOW_STEP_STORE"] + f".{os.environ['MASTER_PORT']}", size)
    distributed._STORE = store
    store.set(f"host/{rank}", f"host{rank} 10.0.0.{rank + 1}")
    return SlowStepWatch(world(rank, size), factor=8.0, min_steps=10, report_wait_s=5.0)


def _late_rank_steps(rank, size):
    watch, out, x = _watch_with_store(rank, size), [], torch.ones(2, 3, requires_grad=True)
    for step in range(14):
        start = time.perf_counter()
        time.sleep(0.05)  # the step's own work: a steady median on a busy machine
        if step == 12 and rank == 1:
            time.sleep(1.8)  # late: rank 0 waits for it in the gather
        distributed.gather_with_grad(x).sum().backward()
        message = watch.observe(step, time.perf_counter() - start)
        if message:
            out.append((step, message))
    return out


def _stalled_steps(rank, size):
    watch, messages = _watch_with_store(rank, size), []
    for step in range(14):
        start = time.perf_counter()
        time.sleep(0.05)
        if step == 11:
            with distributed._timed_wait():  # as if both ranks sat in a collective the network held up
                time.sleep(1.5)
        if step == 13:
            time.sleep(1.5)  # every rank slow on its own, nobody waiting
        dist.barrier()
        message = watch.observe(step, time.perf_counter() - start)
        if message:
            messages.append(message)
    return messages


@pytest.fixture(autouse=True)
def _file_store_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOW_STEP_STORE", str(tmp_path / "store"))
    yield
    distributed._STORE = None


# --- the bounded rejoin -----------------------------------------------------------------------------------------

def test_bounded_rejoin_names_the_node_that_did_not_come_back(monkeypatch):
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    seen = {}

    def original(self):
        seen["join_timeout"] = self._settings.timeout._join
        self._state_holder.state = SimpleNamespace(participants={a: 0}, wait_list=set(), complete=False)
        raise RendezvousTimeoutError("timed out")

    monkeypatch.setattr(rdzv.DynamicRendezvousHandler, "next_rendezvous", original)
    distributed.bound_rejoin(42)
    a, b = rdzv._NodeDesc("node-a", 11, 0), rdzv._NodeDesc("node-b", 22, 0)
    handler = SimpleNamespace(_this_node=a, _settings=SimpleNamespace(timeout=SimpleNamespace(
        _join=datetime.timedelta(seconds=600))), _state_holder=SimpleNamespace(state=SimpleNamespace(
            participants={a: 0, b: 1}, wait_list=set(), complete=True)))
    with pytest.raises(RendezvousTimeoutError, match=r"node lost: node-b \(torchrun pid 22\) of the last round "
                                                     r"did not rejoin within 42 s"):
        rdzv.DynamicRendezvousHandler.next_rendezvous(handler)
    assert seen["join_timeout"] == datetime.timedelta(seconds=42)
    assert handler._settings.timeout._join == datetime.timedelta(seconds=600)  # the first join's is kept
    handler._state_holder.state = SimpleNamespace(participants={}, wait_list=set(), complete=False)
    with pytest.raises(RendezvousTimeoutError, match="^timed out$"):  # a first join: torchrun's own timeout
        rdzv.DynamicRendezvousHandler.next_rendezvous(handler)
    assert seen["join_timeout"] == datetime.timedelta(seconds=600)
