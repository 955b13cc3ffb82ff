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


# --- a Ctrl-C is not a crash -------------------------------------------------------------------------------------

def _failure(exitcode: int):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    return ProcessFailure(local_rank=0, pid=123, exitcode=exitcode, error_file="")


def test_interrupted_needs_every_failed_worker_to_have_stopped_for_a_ctrl_c():
    assert agent.interrupted({0: _failure(130), 1: _failure(130)})
    # torchrun SIGTERMs (then SIGKILLs) a node's other workers once one has exited: still the Ctrl-C's end
    assert agent.interrupted({0: _failure(-15), 1: _failure(130)})
    assert agent.interrupted({0: _failure(-9), 1: _failure(130)})
    assert not agent.interrupted({0: _failure(130), 1: _failure(1)})  # another worker crashed: a restart helps
    assert not agent.interrupted({0: _failure(-15)})  # killed, and no worker stopped for a Ctrl-C
    assert not agent.interrupted({0: _failure(143)})  # preemption: launchers restart or requeue
    assert not agent.interrupted({})


@pytest.mark.parametrize("codes, restarts_left", [((130, 130), 0), ((130, 1), 2), ((143,), 2)])
def test_monitor_ends_the_restarts_only_after_a_ctrl_c(monkeypatch, codes, restarts_left):
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    result = RunResult(state=WorkerState.FAILED, failures={r: _failure(c) for r, c in enumerate(codes)})
    monkeypatch.setattr(LocalElasticAgent, "_monitor_workers", lambda self, group: result)  # undone after the test
    agent.no_restart_after_ctrl_c()
    agent.no_restart_after_ctrl_c()  # twice (a second run_agent in one process) wraps torchrun's method once
    me = SimpleNamespace(_remaining_restarts=2)
    assert LocalElasticAgent._monitor_workers(me, None) is result
    assert me._remaining_restarts == restarts_left


def test_a_lost_store_reads_as_no_node_waiting_for_the_grace_only(monkeypatch):
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    answers, now = [2, "lost", "lost", 3, "lost", "lost"], [100.0]

    def original(self):
        answer = answers.pop(0)
        if answer == "lost":
            raise RendezvousConnectionError("The connection to the C10d store has failed")
        return answer

    monkeypatch.setattr(rdzv.DynamicRendezvousHandler, "num_nodes_waiting", original)  # undone after the test
    monkeypatch.setattr(agent.time, "monotonic", lambda: now[0])
    agent.tolerate_a_lost_store(grace_s=15)
    handler = SimpleNamespace()
    poll = rdzv.DynamicRendezvousHandler.num_nodes_waiting
    assert poll(handler) == 2
    assert poll(handler) == 0  # the store is gone: none waiting, for now
    now[0] += 10
    assert poll(handler) == 0
    assert poll(handler) == 3  # it answers again: the clock restarts
    assert poll(handler) == 0
    now[0] += 16
    with pytest.raises(RendezvousConnectionError):  # gone for longer than the grace: as torchrun did
        poll(handler)


def test_agent_ends_with_130_after_a_ctrl_c_and_128_plus_a_signal(monkeypatch, capsys):
    import signal
    import socket

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    monkeypatch.setattr(agent, "bound_rejoin", lambda s: None)
    monkeypatch.setattr(agent, "no_restart_after_ctrl_c", lambda: None)
    monkeypatch.setattr(agent, "tolerate_a_lost_store", lambda: None)
    host = socket.gethostname()

    def raises(err):
        def main(args):
            raise err
        return main

    monkeypatch.setattr(torchrun, "main", raises(ChildFailedError("trainer.main", {0: _failure(130)})))
    assert agent.run_agent(["-m", "x"]) == 130
    assert capsys.readouterr().err.startswith(f"[{host}] interrupted (Ctrl-C or a closed terminal) on this or another "
                                              "node: every worker stopped after its step with a checkpoint (exit 130); "
                                              "not restarting")
    monkeypatch.setattr(torchrun, "main", raises(ChildFailedError("trainer.main", {0: _failure(1)})))
    with pytest.raises(ChildFailedError):  # a crash stays torchrun's report
        agent.run_agent(["-m", "x"])
    for sig, code, words in [(signal.SIGINT, 130, "interrupted (Ctrl-C): forwarded to the workers, they stop after "
                                                   "their step with a checkpoint"),
                             (signal.SIGHUP, 129, "interrupted (the terminal closed: SIGHUP): forwarded to the "
                                                  "workers, they stop after their step with a checkpoint"),
                             (signal.SIGUSR1, 138, "SIGUSR1 received: forwarded to the workers, they stop after"),
                             (signal.SIGQUIT, 131, "SIGQUIT received: forwarded to the workers, they ended without a "
                                                   "checkpoint")]:
        monkeypatch.setattr(torchrun, "main", raises(SignalException("got signal", sigval=sig)))
        assert agent.run_agent(["-m", "x"]) == code
        assert capsys.readouterr().err.startswith(f"[{host}] {words}")


@pytest.mark.slow
@pytest.mark.parametrize("exit_code, workers, runs, agent_code", [(130, 1, 1, 130), (130, 2, 2, 130), (3, 1, 3, 1)],
                         ids=["ctrl-c", "ctrl-c, 2 workers ending apart", "crash"])
def test_torchrun_restarts_a_crash_but_not_a_ctrl_c(tmp_path, exit_code, workers, runs, agent_code):
    """The launchers' agent, for real: workers that exit 130 (a Ctrl-C) run once and the agent ends with 130, also
    when one ends 2 s after the other (torchrun SIGTERMs the later one: -15); a crash is restarted --max-restarts
    times, as before."""
    import subprocess
    import sys

    log = tmp_path / "runs.txt"
    worker = tmp_path / "worker.py"
    worker.write_text(f"import os, sys, time\nopen({str(log)!r}, 'a').write('run\\n')\n"
                      f"time.sleep(2 * int(os.environ['LOCAL_RANK']))\nsys.exit({exit_code})\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.distributed", "--rejoin-timeout=5", "--standalone",
                           f"--nproc_per_node={workers}", "--max-restarts=2", "--monitor-interval=0.1", str(worker)],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == agent_code, proc.stderr[-3000:]
    assert log.read_text().count("run") == runs
    assert ("interrupted (Ctrl-C or a closed terminal)" in proc.stderr) == (exit_code == 130)


# --- nohup -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--standalone", "-m", "trainer.main", "x=SIGHUP"],
     ["--signals-to-handle=SIGTERM,SIGINT,SIGQUIT,SIGUSR1", "--standalone", "-m", "trainer.main", "x=SIGHUP"]),
    (["--signals_to_handle", "SIGHUP,SIGTERM", "--nnodes=2", "train.py", "--signals-to-handle=SIGHUP"],
     ["--signals-to-handle=SIGTERM", "--nnodes=2", "train.py", "--signals-to-handle=SIGHUP"]),
    (["--standalone", "-m", "trainer.main"],  # torchrun's default list, SIGHUP left out
     ["--signals-to-handle=SIGTERM,SIGINT,SIGQUIT", "--standalone", "-m", "trainer.main"]),
])
def test_under_nohup_torchrun_leaves_sighup_alone(monkeypatch, argv, expected):
    import signal

    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN if sig == signal.SIGHUP else signal.SIG_DFL)
    assert agent.respect_nohup(argv) == expected
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    assert agent.respect_nohup(argv) == argv  # a terminal's run: torchrun handles SIGHUP as asked


@pytest.mark.slow
def test_a_nohup_job_outlives_a_hang_up(tmp_path):
    """Bug: torchrun installs a SIGHUP handler whatever nohup set, so `nohup bash launch/single_node.sh ... &` ended
    its workers when the terminal closed. Now the ignored SIGHUP reaches the workers and a hang-up changes nothing."""
    import signal
    import subprocess
    import sys
    import time

    report, started = tmp_path / "report.txt", tmp_path / "started"
    worker = tmp_path / "worker.py"
    worker.write_text(f"import pathlib, signal, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(3)\n"
                      f"pathlib.Path({str(report)!r}).write_text(str(signal.getsignal(signal.SIGHUP)))\n")
    proc = subprocess.Popen([sys.executable, "-m", "trainer.distributed", "--standalone", "--nproc_per_node=1",
                             "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", str(worker)],
                            cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # what nohup does
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)  # the closing terminal's
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert report.read_text() == str(signal.SIG_IGN)  # the worker ran to its end, SIGHUP still ignored
