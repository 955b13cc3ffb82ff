"""trainer.rendezvous without torchrun: the round id every rank agrees on, and the loopback check with its exit."""
from __future__ import annotations

import datetime
import threading

import pytest
import torch.distributed as dist

from trainer import rendezvous
from trainer.distributed import WorldInfo


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
                got[r] = rendezvous.agreed_round(store, world(r, 3, restart_counts[r]), timeout)
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
        rendezvous.agreed_round(server, world(0, 3), datetime.timedelta(seconds=1))


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
    problem = rendezvous.check_network(world(0, 2), "gloo", store)
    assert problem is not None
    assert "host name 'node-b' resolves to 127.0.1.1" in problem and "node-a" not in problem
    assert "GLOO_SOCKET_IFNAME" in problem and "NCCL_SOCKET_IFNAME" in problem and "SOCKET_IFNAME=eth0" in problem
    unresolved = rendezvous.check_network(world(1, 2), "gloo", host_store("node-a nothing", "node-b 10.0.0.2"))
    assert "host name 'node-a' resolves to nothing" in unresolved
    # a CUDA run (NCCL) still has a gloo group for its stop flag: the same check
    assert rendezvous.check_network(world(0, 2), "nccl", store) == problem


@pytest.mark.parametrize("case", ["one host", "interface set", "one node"])
def test_loopback_host_name_is_fine_where_it_cannot_matter(monkeypatch, case):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2" if case == "one node" else "1")
    hosts = ("vm 127.0.1.1", "vm 127.0.1.1") if case == "one host" else ("a 127.0.1.1", "b 127.0.1.1")
    if case == "interface set":
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    assert rendezvous.check_network(world(0, 2), "gloo", host_store(*hosts)) is None


def test_network_problem_stops_the_rank_with_exit_code_2_naming_the_variable(monkeypatch, capsys):
    """The check runs where init publishes this rank's host: a loopback host name on another node ends the process
    as a configuration error (exit 2) with one line naming the host and GLOO_SOCKET_IFNAME."""
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(rendezvous, "host_and_address", lambda: "node-b 127.0.1.1")
    store = host_store("node-a 10.0.0.1")
    with pytest.raises(SystemExit) as stopped:
        rendezvous.publish_host_and_check(WorldInfo(rank=1, local_rank=0, world_size=2, restart_count=0), "gloo",
                                          store)
    assert stopped.value.code == 2
    assert store.get("host/1") == b"node-b 127.0.1.1"  # published for the other ranks' check and reports
    assert store.add("network_checked", 0) == 1
    line = capsys.readouterr().err
    assert line.startswith("config error: [rank 1] host name 'node-b' resolves to 127.0.1.1") and \
        "GLOO_SOCKET_IFNAME is not set" in line


def test_network_fine_publishes_the_host_and_returns(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(rendezvous, "host_and_address", lambda: "node-b 10.0.0.2")
    store = host_store("node-a 10.0.0.1")
    rendezvous.publish_host_and_check(world(1, 2), "gloo", store)
    assert store.get("host/1") == b"node-b 10.0.0.2" and capsys.readouterr().err == ""


def test_host_and_address_is_this_hosts_name():
    import socket
    name, addr = rendezvous.host_and_address().split()
    assert name == socket.gethostname() and addr
