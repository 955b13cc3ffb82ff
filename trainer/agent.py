"""The torchrun the launchers run (`python -m trainer.distributed --rejoin-timeout=S TORCHRUN_ARGS...`): torchrun
whose rendezvous, after a failure, waits a bounded time for the nodes of the round that ended and names a lost one."""
from __future__ import annotations

import datetime
import socket
import sys


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
