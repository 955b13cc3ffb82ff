"""trainer.distributed: the collectives on two gloo ranks against one process, the process group's error report,
and the slow-step watch (fed times, and on two gloo ranks where one is late)."""
from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist

from tests.conftest import run_distributed
from trainer import distributed
from trainer.distributed import SlowStepWatch, WorldInfo


def world(rank: int = 0, size: int = 1, restarts: int = 0) -> WorldInfo:
    return WorldInfo(rank=rank, local_rank=0, world_size=size, restart_count=restarts)


# --- the collectives against one process ------------------------------------------------------------------------

def rank_rows(rank: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(10 + rank))


def rank_weights(rank: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(20 + rank))


def rank_loss(rank: int, gathered: torch.Tensor) -> torch.Tensor:
    """Each rank's own loss of every rank's rows (nonlinear, different weights per rank), as NT-Xent is."""
    return (gathered @ rank_weights(rank)).tanh().square().sum() * (rank + 1)


def _collectives(rank: int, size: int) -> dict:
    x = rank_rows(rank).requires_grad_()
    gathered = distributed.gather_with_grad(x)
    rank_loss(rank, gathered).backward()
    local = rank_rows(rank)
    mean, biggest = distributed.all_reduce_mean(local), distributed.all_reduce_max(local)
    return {"gathered": gathered.detach(), "grad": x.grad, "mean": mean, "max": biggest,
            "input_kept": torch.equal(local, rank_rows(rank))}


def test_collectives_on_two_ranks_equal_one_process():
    """gather_with_grad forward is the rows of every rank in rank order; its backward gives each rank the gradient
    of the sum of all ranks' losses (what one process computes on the whole batch) for its own rows."""
    results = run_distributed(_collectives, 2, timeout_s=120)
    whole = torch.cat([rank_rows(0), rank_rows(1)]).requires_grad_()
    sum(rank_loss(r, whole) for r in range(2)).backward()
    for r, got in enumerate(results):
        torch.testing.assert_close(got["gathered"], whole.detach(), rtol=0, atol=0)
        torch.testing.assert_close(got["grad"], whole.grad[3 * r:3 * r + 3], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["mean"], (rank_rows(0) + rank_rows(1)) / 2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["max"], torch.maximum(rank_rows(0), rank_rows(1)), rtol=0, atol=0)
        assert got["input_kept"]  # the reductions work on a copy
    assert not torch.allclose(results[0]["grad"], torch.autograd.grad(rank_loss(0, whole), whole)[0][:3])


def test_collectives_are_the_identity_without_a_process_group():
    x = rank_rows(0).requires_grad_()
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather_with_grad(x) is x
    assert distributed.all_reduce_mean(x) is x and distributed.all_reduce_max(x) is x


def test_process_group_names_the_failing_rank_and_ends_the_group(capsys):
    with pytest.raises(ValueError, match="boom"):
        with distributed.process_group(world(), "cpu", timeout_s=60) as ctx:
            assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device) == (0, 1, "gloo", torch.device("cpu"))
            assert dist.is_initialized()
            raise ValueError("boom")
    assert not dist.is_initialized()
    assert capsys.readouterr().err == "[rank 0] failed: ValueError: boom\n"


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
