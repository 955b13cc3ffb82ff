"""The torchrun the launchers run (`python -m trainer.distributed --rejoin-timeout=S TORCHRUN_ARGS...`): torchrun
whose rendezvous, after a failure, waits a bounded time for the nodes of the round that ended and names a lost one;
that does not restart workers a Ctrl-C stopped, nor fails while they exit after the store's node ended; that keeps
nohup's ignored SIGHUP; and that ends on a stop signal with one line, not a traceback."""
from __future__ import annotations

import datetime
import signal
import socket
import time

from trainer.metrics import write_console
from trainer.preemption import INTERRUPTED_EXIT_CODE, PreemptionWatch


def _wrap_method(owner: type, name: str, wrap) -> None:
    """owner.name = wrap(original), where original is torchrun's own method even when it was wrapped before (a
    second run_agent in one process wraps it once, not twice)."""
    current = getattr(owner, name)
    original = getattr(current, "unwrapped", current)
    wrapped = wrap(original)
    wrapped.unwrapped = original
    setattr(owner, name, wrapped)


def bound_rejoin(rejoin_timeout_s: float) -> None:
    """Makes torchrun's c10d rendezvous wait at most `rejoin_timeout_s` for the nodes of the round that ended.

    After a failure every agent rejoins, and torchrun waits for the missing nodes as long as for the first join
    (join_timeout, 600 s by default), then ends with a bare RendezvousTimeoutError. A node that was in the last
    round and has not come back within a minute is lost (its agent is dead): the job ends sooner, naming it. The
    first join keeps join_timeout (nodes started by hand may come minutes apart)."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    def next_rendezvous(self, original):
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

    _wrap_method(rdzv.DynamicRendezvousHandler, "next_rendezvous",
                 lambda original: lambda self: next_rendezvous(self, original))


# How a worker that torchrun stopped itself ends: as soon as one worker of a node has exited, torchrun sends the
# node's others SIGTERM (and SIGKILL 30 s later); their exit code is minus the signal's number.
_STOPPED_BY_TORCHRUN = {-signal.SIGTERM, -signal.SIGKILL}


def interrupted(failures: dict) -> bool:
    """Whether a round's failed workers (torchrun's {rank: ProcessFailure}) ended as a Ctrl-C ends them: after their
    step, with the checkpoint written (trainer.preemption; every rank decides the same), or stopped by torchrun
    because a sibling had."""
    codes = {f.exitcode for f in failures.values()}
    return INTERRUPTED_EXIT_CODE in codes and codes <= {INTERRUPTED_EXIT_CODE, *_STOPPED_BY_TORCHRUN}


def no_restart_after_ctrl_c() -> None:
    """Makes torchrun end, not restart its workers (--max-restarts), when they all stopped for a Ctrl-C.

    A Ctrl-C on one node reaches that node's torchrun only; through the workers' shared stop decision every rank on
    every node ends with INTERRUPTED_EXIT_CODE. The other nodes' torchrun took that for a crash: they restarted
    their workers and waited for the stopped node until NODE_LOST_TIMEOUT_S, then ended with "node lost"."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    def monitor_workers(self, worker_group, original):
        result = original(self, worker_group)
        if result.state == WorkerState.FAILED and interrupted(result.failures):
            self._remaining_restarts = 0  # torchrun then stops the group and raises ChildFailedError
        return result

    _wrap_method(LocalElasticAgent, "_monitor_workers",
                 lambda original: lambda self, worker_group: monitor_workers(self, worker_group, original))


def tolerate_a_lost_store(grace_s: float = 15.0) -> None:
    """Makes torchrun's poll for nodes waiting to join report none for `grace_s` after the rendezvous store stopped
    answering, before it fails as before.

    While its workers run, torchrun polls the store every --monitor-interval. When the node that hosts the store ends
    first (a Ctrl-C there stops every node's workers after the same step, and that node's torchrun exits with its
    own), another node's poll can fail while its workers are still exiting: torchrun then killed them and ended with
    a RendezvousConnectionError traceback. Within the grace its next look at the workers sees how they ended."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    lost_since: dict[int, float] = {}  # handler id -> when its store stopped answering

    def num_nodes_waiting(self, original) -> int:
        try:
            waiting = original(self)
        except RendezvousConnectionError:
            since = lost_since.setdefault(id(self), time.monotonic())
            if time.monotonic() - since > grace_s:
                raise
            return 0
        lost_since.pop(id(self), None)
        return waiting

    _wrap_method(rdzv.DynamicRendezvousHandler, "num_nodes_waiting",
                 lambda original: lambda self: num_nodes_waiting(self, original))


def respect_nohup(argv: list[str]) -> list[str]:
    """torchrun's arguments, without SIGHUP among the signals it handles when this process ignores SIGHUP (nohup).

    torchrun installs its own handler for each signal of --signals-to-handle (default SIGTERM,SIGINT,SIGHUP,SIGQUIT),
    so `nohup bash launch/single_node.sh ... &` ended its workers anyway when the terminal closed. Left ignored, the
    disposition reaches the workers (exec keeps ignored signals), whose stop-signal watch then leaves it alone too.
    Only torchrun's options, before `-m` or the training script, are read."""
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        return argv
    out, i, found = [], 0, False
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" or arg.endswith(".py"):  # the training program and its own arguments: as they are
            out += argv[i:]
            break
        name, eq, value = arg.partition("=")
        if name in ("--signals-to-handle", "--signals_to_handle"):
            if not eq and i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            arg = "--signals-to-handle=" + ",".join(s for s in value.split(",") if s.strip() != "SIGHUP")
            found = True
        out.append(arg)
        i += 1
    return out if found else ["--signals-to-handle=SIGTERM,SIGINT,SIGQUIT", *out]


def run_agent(argv: list[str]) -> int:
    """`python -m trainer.distributed [--rejoin-timeout S] TORCHRUN_ARGS...`: torchrun with bound_rejoin(S),
    no_restart_after_ctrl_c(), tolerate_a_lost_store() and respect_nohup(). Exit code: torchrun's; 130 when the
    workers stopped for a Ctrl-C (on any node); 128 + the signal's number when a stop signal reached this torchrun
    (it forwarded it to its workers first)."""
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
    tolerate_a_lost_store()
    host = socket.gethostname()
    try:
        torchrun_main(respect_nohup(argv))
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
