"""The torchrun the launchers run (`python -m trainer.distributed --rejoin-timeout=S TORCHRUN_ARGS...`): torchrun
whose rendezvous, after a failure, waits a bounded time for the nodes of the round that ended and names a lost one;
that does not restart workers a Ctrl-C stopped; and that ends on a stop signal with one line, not a traceback."""
from __future__ import annotations

import datetime
import signal
import socket

from trainer.metrics import write_console
from trainer.preemption import INTERRUPTED_EXIT_CODE, PreemptionWatch


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


def interrupted(failures: dict) -> bool:
    """Whether every failed worker of a round (torchrun's {rank: ProcessFailure}) exited as a Ctrl-C ends one: after
    its step, with the checkpoint written (trainer.preemption; every rank decides the same)."""
    return bool(failures) and all(f.exitcode == INTERRUPTED_EXIT_CODE for f in failures.values())


def no_restart_after_ctrl_c() -> None:
    """Makes torchrun end, not restart its workers (--max-restarts), when they all stopped for a Ctrl-C.

    A Ctrl-C on one node reaches that node's torchrun only; through the workers' shared stop decision every rank on
    every node ends with INTERRUPTED_EXIT_CODE. The other nodes' torchrun took that for a crash: they restarted
    their workers and waited for the stopped node until NODE_LOST_TIMEOUT_S, then ended with "node lost"."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    original = getattr(LocalElasticAgent._monitor_workers, "unpatched", LocalElasticAgent._monitor_workers)

    def _monitor_workers(self, worker_group):
        result = original(self, worker_group)
        if result.state == WorkerState.FAILED and interrupted(result.failures):
            self._remaining_restarts = 0  # torchrun then stops the group and raises ChildFailedError
        return result

    _monitor_workers.unpatched = original
    LocalElasticAgent._monitor_workers = _monitor_workers


def run_agent(argv: list[str]) -> int:
    """`python -m trainer.distributed [--rejoin-timeout S] TORCHRUN_ARGS...`: torchrun with bound_rejoin(S) and
    no_restart_after_ctrl_c(). Exit code: torchrun's; 130 when the workers stopped for a Ctrl-C (on any node); 128 +
    the signal's number when a stop signal reached this torchrun (it forwarded it to its workers first)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import main as torchrun_main

    rejoin_s = 60.0
    if argv and argv[0].startswith("--rejoin-timeout"):
        value = argv[0].split("=", 1)[1] if "=" in argv[0] else argv[1]
        argv = argv[1:] if "=" in argv[0] else argv[2:]
        rejoin_s = float(value)
    bound_rejoin(rejoin_s)
    no_restart_after_ctrl_c()
    host = socket.gethostname()
    try:
        torchrun_main(argv)
    except ChildFailedError as err:
        if not interrupted(err.failures):
            raise
        write_console(f"[{host}] interrupted (Ctrl-C or a closed terminal) on this or another node: every worker "
                      f"stopped after its step with a checkpoint (exit {INTERRUPTED_EXIT_CODE}); not restarting them. "
                      f"Rerun the same command (on every node) to resume", stderr=True)
        return INTERRUPTED_EXIT_CODE
    except SignalException as err:
        what = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGHUP: "interrupted (the terminal closed: SIGHUP)"
                }.get(err.sigval, f"{signal.Signals(err.sigval).name} received")
        how = ("they stop after their step with a checkpoint (within --shutdown-timeout)"
               if err.sigval in PreemptionWatch.SIGNALS else "they ended without a checkpoint")
        write_console(f"[{host}] {what}: forwarded to the workers, {how}; rerun the same command (on every node) to "
                      f"resume", stderr=True)
        return 128 + int(err.sigval)
    except RendezvousTimeoutError as err:
        if not str(err).startswith("node lost"):
            raise
        write_console(f"[{host}] {err}", stderr=True)
        return 1
    return 0
