"""trainer.agent: the bounded rejoin of torchrun's rendezvous and the command line the launchers run."""
from __future__ import annotations

import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer import agent

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
    agent.bound_rejoin(42)
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


@pytest.mark.parametrize("argv", [["--rejoin-timeout=45", "--nnodes=2", "-m", "x"],
                                  ["--rejoin-timeout", "45", "--nnodes=2", "-m", "x"]])
def test_agent_reads_its_timeout_and_hands_the_rest_to_torchrun(monkeypatch, argv):
    import torch.distributed.run as torchrun

    seen = {}
    monkeypatch.setattr(agent, "bound_rejoin", lambda s: seen.update(rejoin_s=s))
    monkeypatch.setattr(torchrun, "main", lambda args: seen.update(argv=args))
    assert agent.run_agent(argv) == 0
    assert seen == {"rejoin_s": 45.0, "argv": ["--nnodes=2", "-m", "x"]}


def test_agent_ends_with_1_on_a_lost_node_and_reraises_other_timeouts(monkeypatch, capsys):
    import socket

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    monkeypatch.setattr(agent, "bound_rejoin", lambda s: None)

    def lost(args):
        raise RendezvousTimeoutError("node lost: node-b (torchrun pid 22) of the last round did not rejoin")

    monkeypatch.setattr(torchrun, "main", lost)
    assert agent.run_agent(["-m", "x"]) == 1
    assert capsys.readouterr().err == f"[{socket.gethostname()}] node lost: node-b (torchrun pid 22) of the last " \
                                      "round did not rejoin\n"

    def first_join(args):
        raise RendezvousTimeoutError("timed out")

    monkeypatch.setattr(torchrun, "main", first_join)
    with pytest.raises(RendezvousTimeoutError, match="^timed out$"):
        agent.run_agent(["-m", "x"])


def test_distributed_module_runs_the_agent():
    """The launchers' command, `python -m trainer.distributed --rejoin-timeout=N TORCHRUN_ARGS`, reaches torchrun."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "trainer.distributed", "--rejoin-timeout=5", "--help"],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--nproc-per-node" in proc.stdout and "--rdzv-backend" in proc.stdout
