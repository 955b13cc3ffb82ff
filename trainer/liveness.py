"""Signs of life in a distributed job: each rank's heartbeat in the job's store, the report of which ranks still
beat (printed when a collective times out), and a torchrun worker's watch on its launcher."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import torch.distributed as dist

from trainer.metrics import write_console

if TYPE_CHECKING:
    from trainer.distributed import WorldInfo

HEARTBEAT_S = 2.0


def _beat(store: dist.Store, rank: int, progress: dict, stop: threading.Event) -> None:
    """Every few seconds: 'time step' under heartbeat/<rank>. A stopped or dead process stops beating."""
    while not stop.wait(HEARTBEAT_S):
        try:
            store.set(f"heartbeat/{rank}", f"{time.time():.3f} {progress['step']}")
        except Exception:  # noqa: BLE001 - the store may go away at shutdown
            return


def start_heartbeat(store: dist.Store, rank: int, progress: dict, stop: threading.Event) -> None:
    """A daemon thread that publishes progress['step'] until `stop` is set. `store` must be a connection of its
    own: the main thread may be blocked in a collective, or in a store call, while the thread beats."""
    threading.Thread(target=_beat, args=(store, rank, progress, stop), daemon=True, name="heartbeat").start()


def host_of(store: dist.Store, rank: int) -> str:
    """The host name rank `rank` published at start-up ('?' when it did not)."""
    key = f"host/{rank}"
    return store.get(key).decode().split()[0] if store.check([key]) else "?"


def progress_report(store: dist.Store | None, world: WorldInfo) -> str:
    """Which ranks still beat and where they are, e.g. 'rank 1 on node-b: step 55, last heartbeat 14 s ago;
    silent (dead or hung): rank 1 on node-b'; empty without a store or with one rank."""
    if store is None or world.world_size == 1:
        return ""
    parts, silent = [], []
    try:
        for r in range(world.world_size):
            key, who = f"heartbeat/{r}", f"rank {r} on {host_of(store, r)}"
            if not store.check([key]):
                parts.append(f"{who}: no heartbeat yet")
                silent.append(who)
                continue
            stamp, step = store.get(key).decode().split()
            age = time.time() - float(stamp)  # the clock read after the store read (which can block)
            parts.append(f"{who}: step {step}, last heartbeat {age:.0f} s ago")
            if age > 3 * HEARTBEAT_S:
                silent.append(who)
    except Exception:  # noqa: BLE001 - the store itself may be gone with the failed job
        return ""
    verdict = f"; silent (dead or hung): {', '.join(silent)}" if silent else ""
    return "; ".join(parts) + verdict


def watch_parent(parent: int, stop: threading.Event, poll_s: float = HEARTBEAT_S) -> threading.Thread:
    """Stops this process the way a preemption does (SIGTERM to itself: every rank agrees to stop, rank 0
    checkpoints, exit 143) once its parent `parent` is gone, e.g. a torchrun agent killed with SIGKILL: its
    workers would otherwise train on as orphans, writing checkpoints beside the restarted job's. Only for
    workers a launcher started; a plain `python -m` run may outlive its shell (nohup) on purpose. Setting
    `stop` ends the watch."""
    stop.clear()

    def loop() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                write_console(f"[pid {os.getpid()}] the launcher (pid {parent}) is gone: stopping", stderr=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=loop, daemon=True, name="parent-watch")
    thread.start()
    return thread
