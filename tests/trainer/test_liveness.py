"""trainer.liveness: the heartbeat thread and its report, and a worker's watch on its launcher."""
from __future__ import annotations

import datetime
import re
import threading
import time

import torch.distributed as dist

from trainer import liveness
from trainer.distributed import WorldInfo


def world(rank: int = 0, size: int = 1) -> WorldInfo:
    return WorldInfo(rank=rank, local_rank=0, world_size=size, restart_count=0)


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


def test_heartbeat_age_is_read_after_the_store_read():
    """Bug: the report read the clock before store reads that can block, printing 'last heartbeat -12 s ago'."""
    report = liveness.progress_report(SlowStore(1.2), world(0, 2))
    ages = [int(a) for a in re.findall(r"last heartbeat (-?\d+) s ago", report)]
    assert len(ages) == 2 and all(0 <= a <= 1 for a in ages), report
    assert "rank 1 on node-x: step 7" in report


def test_report_names_the_silent_rank_and_the_one_that_never_beat():
    store = dist.HashStore()
    for r, host in enumerate(("node-a", "node-b", "node-c")):
        store.set(f"host/{r}", f"{host} 10.0.0.{r + 1}")
    store.set("heartbeat/0", f"{time.time() - 1:.3f} 41")
    store.set("heartbeat/1", f"{time.time() - 60:.3f} 17")  # stopped beating a minute ago
    report = liveness.progress_report(store, world(0, 3))
    assert report.startswith("rank 0 on node-a: step 41, last heartbeat 1 s ago; rank 1 on node-b: step 17, "
                             "last heartbeat 60 s ago; rank 2 on node-c: no heartbeat yet"), report
    assert report.endswith("; silent (dead or hung): rank 1 on node-b, rank 2 on node-c")
    assert liveness.progress_report(None, world(0, 3)) == "" and liveness.progress_report(store, world()) == ""


def test_heartbeat_publishes_the_current_step_until_stopped(monkeypatch):
    monkeypatch.setattr(liveness, "HEARTBEAT_S", 0.05)
    store, progress, stop = dist.HashStore(), {"step": 3}, threading.Event()
    liveness.start_heartbeat(store, 1, progress, stop)
    store.wait(["heartbeat/1"], datetime.timedelta(seconds=10))
    progress["step"] = 9
    deadline = time.monotonic() + 10
    while store.get("heartbeat/1").split()[1] != b"9" and time.monotonic() < deadline:
        time.sleep(0.02)
    stamp, step = store.get("heartbeat/1").decode().split()
    assert step == "9" and abs(time.time() - float(stamp)) < 5
    stop.set()
    time.sleep(0.2)  # the thread sees the stop within one beat
    last = store.get("heartbeat/1")
    time.sleep(0.2)
    assert store.get("heartbeat/1") == last  # no beat after the stop


def test_watch_parent_stops_this_process_once_the_launcher_is_gone():
    """An orphaned worker sends itself SIGTERM (the preemption path); with its launcher alive it does nothing."""
    import os
    import signal

    received = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    alive_stop, stop = threading.Event(), threading.Event()
    try:
        alive = liveness.watch_parent(os.getppid(), alive_stop, poll_s=0.01)  # the real parent: alive
        assert not received.wait(0.3)
        alive_stop.set()
        alive.join(5)
        gone = liveness.watch_parent(-1, stop, poll_s=0.01)  # a parent id no process has: as if it had died
        deadline = time.monotonic() + 10
        while not received.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs in the main thread, between these sleeps
        assert received.is_set()
        gone.join(5)
        assert not gone.is_alive()  # one signal, then the watch ends
    finally:
        alive_stop.set()
        stop.set()
        signal.signal(signal.SIGTERM, previous)
