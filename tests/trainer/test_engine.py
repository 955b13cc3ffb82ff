"""The run: the network as DDP wraps it (N ranks = one process), the random-init reference, the checkpointed RNG
state of this rank's device, and the Trainer's checkpoint cadence, preemption and final table."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from trainer import checkpoint, engine
from trainer.config_load import load_config
from trainer.distributed import DistContext
from trainer.loss import NTXentLoss
from trainer.model import build_model, build_network, random_init_backbone
from trainer.optim import build_optimizer
from trainer.run_state import Progress
from trainer.step import train_step

TINY = ["model.small_stem=true", "model.out_dim=16", "model.base_model=resnet18", "batch_size=8", "amp=off",
        "dataset.name=synthetic", "dataset.input_shape=(8,8,3)", "optim.weight_decay=1e-4"]


class _Quiet:
    def info(self, *_):
        pass

    warn = info


def test_random_init_backbone_is_the_seeded_init_and_leaves_the_rng_alone():
    cfg = load_config(None, [*TINY, "seed=3"])
    torch.manual_seed(3)
    seeded = build_model(cfg.model).backbone.state_dict()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    rebuilt = random_init_backbone(cfg, torch.device("cpu")).state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the run continues with its own stream
    assert rebuilt.keys() == seeded.keys()
    for key in seeded:
        assert torch.equal(rebuilt[key], seeded[key]), key


def _views(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def _train(rank: int, world_size: int, overrides: list[str], steps: int = 3) -> dict:
    """build_network + LARS + train_step on this rank's slice of a fixed global batch; returns the weights."""
    cfg = load_config(None, [*TINY, *overrides])
    ctx = DistContext(rank, rank, world_size, torch.device("cpu"), "gloo")
    model, train_model = build_network(cfg, ctx, _Quiet())
    optimizer = build_optimizer(model, cfg.optim, 0.05)  # at 0.5 three steps are chaotic: 1e-7 apart -> 1e-2
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    n = cfg.batch_size // world_size
    for step in range(steps):
        x1, x2 = _views(step, cfg.batch_size)
        train_step(train_model, NTXentLoss(0.2), optimizer, scaler, x1[rank * n:(rank + 1) * n],
                   x2[rank * n:(rank + 1) * n], amp_dtype=None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["_ddp"] = {"gradient_as_bucket_view": train_model.gradient_as_bucket_view,
                     "static_graph": train_model.static_graph,
                     "global_bn": sum(type(m).__name__ == "GlobalBatchNorm" for m in model.modules()),
                     "plain_bn": sum(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())}
    return state


def _single(rank, world_size, overrides):
    return _train(0, 1, overrides)


@pytest.mark.parametrize("step_mode", ["direct", "checkpoint"])
def test_ddp_with_global_bn_on_two_ranks_equals_one_process(distributed_run, step_mode):
    """What the engine builds (global BN, gradient buckets as views, static graph, no buffer broadcast) on 2
    ranks gives the parameters and BN statistics of one process with plain BN on the concatenated batch."""
    overrides = [f"step_mode={step_mode}"]
    one = distributed_run(_single, 1, overrides)[0]
    two = distributed_run(_train, 2, overrides)
    info = two[0].pop("_ddp")
    assert info["gradient_as_bucket_view"] and info["static_graph"]
    assert info["plain_bn"] == 0 and info["global_bn"] == one.pop("_ddp")["plain_bn"] > 0  # every BN converted
    two[1].pop("_ddp")
    for key, expected in one.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(two[0][key], expected), key
            continue
        torch.testing.assert_close(two[0][key], expected, atol=2e-5, rtol=1e-4, msg=key)
        assert torch.equal(two[0][key], two[1][key]), key  # the ranks agree without a buffer broadcast


def _cached_ddp(rank, world_size):
    cfg = load_config(None, [*TINY, "step_mode=cached"])
    ctx = DistContext(rank, rank, world_size, torch.device("cpu"), "gloo")
    _, train_model = build_network(cfg, ctx, _Quiet())
    return train_model.static_graph


def test_cached_step_mode_builds_ddp_without_a_static_graph(distributed_run):
    # several forwards per step under no_sync are not a static graph: DDP would raise on the second chunk
    assert distributed_run(_cached_ddp, 2) == [False, False]


class _FakeCuda:
    """Stands in for torch.cuda on a machine with `visible` devices; records what was read and set."""

    def __init__(self, visible: int):
        self.visible, self.set_calls = visible, []

    def get_rng_state(self, device):
        return torch.tensor([10 + device.index], dtype=torch.uint8)

    def set_rng_state(self, state, device):
        if device.index >= self.visible:
            raise IndexError(f"device {device.index} of {self.visible}")
        self.set_calls.append((int(state[0]), device.index))

    def get_rng_state_all(self):
        return [torch.tensor([10 + i], dtype=torch.uint8) for i in range(self.visible)]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, torch.device("cuda", i))


def test_cuda_rng_state_is_this_ranks_device_only(monkeypatch):
    """Saved on a node with 8 visible devices by local rank 3, restored where the scheduler shows one device
    (CUDA_VISIBLE_DEVICES per task): only that device's state travels, and it goes to the restarted rank's device."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = load_config(None, TINY)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(_FakeCuda(8), name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    run = SimpleNamespace(model=model, optimizer=optimizer, scaler=scaler, progress=Progress(5, 1, 2))
    state = checkpoint.training_state(run, cfg, 8, torch.device("cuda", 3))
    assert torch.equal(state["rng_cuda"], torch.tensor([13], dtype=torch.uint8))
    after_restart = _FakeCuda(1)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(after_restart, name))
    progress = checkpoint.restore(state, run, torch.device("cuda", 0))
    assert after_restart.set_calls == [(13, 0)]
    assert (progress.step, progress.epoch, progress.step_in_epoch) == (5, 1, 2)
    # a checkpoint written before this fix holds every device's state: this rank's is taken, others ignored
    state["rng_cuda"] = _FakeCuda(8).get_rng_state_all()
    checkpoint.restore(state, run, torch.device("cuda", 0))
    assert after_restart.set_calls[-1] == (10, 0)


def _run_with_probe(rank, world_size, output_dir):
    cfg = load_config(None, [*TINY, f"output_dir={output_dir}", "dataset.synthetic_size=64", "epochs=1",
                             "max_steps=2", "log_every_n_steps=1", "model.sync_bn_group_size=1",
                             "eval.final_probe=true", "eval.knn_monitor=false", "eval.knn_k=5"])
    ctx = DistContext(rank, rank, world_size, torch.device("cpu"), "gloo")
    results = engine.run(cfg, ctx)
    return {k: v for k, v in results.items() if k in ("simclr", "random_init", "step")}


@pytest.mark.slow
def test_final_probe_with_batchnorm_in_process_groups(distributed_run, tmp_path):
    """BN layers that hold a process group (groups of sync_bn_group_size ranks) cannot be deep-copied: the
    random-init reference of the final probe is rebuilt from the seed, so such a run reaches its table."""
    results = distributed_run(_run_with_probe, 2, str(tmp_path / "run"))
    assert results[0]["step"] == results[1]["step"] == 2
    assert set(results[0]) == {"step", "simclr", "random_init"} and set(results[1]) == {"step"}  # rank 0's table
    for row in ("simclr", "random_init"):
        assert set(results[0][row]) == {"linear_top1", "knn_top1"}


SMALL_RUN = [*TINY, "model.base_model=resnet8", "dataset.synthetic_size=64", "eval.final_probe=false",
             "eval.knn_monitor=false", "log_every_n_steps=2", "optim.warmup_epochs=0"]


def _checkpoint_steps(output_dir) -> list[int]:
    return [checkpoint.load(p)["step"] for p in checkpoint.list_checkpoints(output_dir)]


def _run_one(rank, world_size, overrides):
    cfg = load_config(None, overrides)
    return engine.run(cfg, DistContext(rank, rank, world_size, torch.device("cpu"), "gloo"))


def test_checkpoints_at_epoch_ends_every_n_steps_and_the_last_step(tmp_path, distributed_run):
    overrides = [*SMALL_RUN, f"output_dir={tmp_path}", "epochs=3", "max_steps=8", "checkpoint_every_n_steps=3",
                 "keep_checkpoints=100"]
    results = distributed_run(_run_one, 1, overrides)[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_epoch = next(r["step"] for r in records if r["kind"] == "epoch")  # the first epoch's end
    assert 1 < per_epoch < 8
    expected = sorted({s for s in range(1, 9) if s % per_epoch == 0 or s % 3 == 0} | {8})
    assert results["step"] == 8
    assert _checkpoint_steps(tmp_path) == expected  # e.g. 3, 5 (epoch end), 6, 8 (max_steps) at 5 steps an epoch
    state = checkpoint.load(checkpoint.list_checkpoints(tmp_path)[-1])
    assert (state["epoch"], state["step_in_epoch"]) == (8 // per_epoch, 8 % per_epoch)


def _preempted_at_step_3(rank, world_size, output_dir, signal_name="SIGUSR1"):
    import os
    import signal
    import time

    calls = []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the signal lands during step 3: that step completes, then the run stops
            os.kill(os.getpid(), signal.Signals[signal_name])
        return train_step(*args, **kwargs)

    engine.train_step = step_then_signal  # the step the Trainer builds with (this forked process only)
    cfg = load_config(None, [*SMALL_RUN, f"output_dir={output_dir}", "epochs=5"])
    ctx = DistContext(rank, rank, world_size, torch.device("cpu"), "gloo")
    try:
        engine.run(cfg, ctx)
    except SystemExit as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's to a node's last workers once one has exited
        time.sleep(0.1)
        return {"code": stop.code, "preempted": isinstance(stop, engine.Preempted), "survived a SIGTERM": True}
    return {"code": None}


@pytest.mark.parametrize("signal_name, code", [("SIGUSR1", 143), ("SIGINT", 130), ("SIGHUP", 130)])
def test_a_stop_signal_checkpoints_the_step_and_exits(tmp_path, distributed_run, signal_name, code):
    """A preemption exits 143 (torchrun and the scheduler restart it), a Ctrl-C or a closed terminal 130 (the user's
    stop); all after the step the signal interrupted, with its checkpoint. On the way out the stop signals stay
    handled: torchrun's SIGTERM to a node's other workers once one has exited does not turn their exit into a crash."""
    outcome = distributed_run(_preempted_at_step_3, 1, str(tmp_path), signal_name)[0]
    assert outcome == {"code": code, "preempted": True, "survived a SIGTERM": True}
    assert _checkpoint_steps(tmp_path)[-1] == 3


def _ctrl_c_in_the_last_epochs_end(rank, world_size, output_dir):
    import os
    import signal

    finished, end_of_epoch = [], engine.Trainer._end_of_epoch

    def end_then_signal(self, run, rate):
        if run.progress.step == run.schedule.stop_step:  # the kNN monitor / validation after the last step
            os.kill(os.getpid(), signal.SIGINT)
        return end_of_epoch(self, run, rate)

    engine.Trainer._end_of_epoch = end_then_signal  # this forked process only
    engine.Trainer.finish = lambda self, run: finished.append(run.progress.step) or {}
    cfg = load_config(None, [*SMALL_RUN, f"output_dir={output_dir}", "epochs=2"])
    try:
        engine.run(cfg, DistContext(rank, rank, world_size, torch.device("cpu"), "gloo"))
    except SystemExit as stop:
        return {"code": stop.code, "finished": finished}
    return {"code": None, "finished": finished}


def test_a_ctrl_c_after_the_last_step_skips_the_final_evaluation(tmp_path, distributed_run):
    """The last step's check has passed: the stop is taken before the final probe, not ignored."""
    outcome = distributed_run(_ctrl_c_in_the_last_epochs_end, 1, str(tmp_path))[0]
    assert outcome == {"code": 130, "finished": []}
    state = checkpoint.load(checkpoint.list_checkpoints(tmp_path)[-1])
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0)  # the run's last step, checkpointed


def test_the_epoch_line_states_the_time_left_with_its_rate():
    # 4 steps in 2 s: 2 steps/s, 512 images/s at a global batch of 256; 10 steps left: 5 s
    assert engine._Rate(4, 2.0, 10, 256).eta() == "0 min 05 s of training left (2.00 steps/s, 512 img/s)"
    assert engine._Rate(3, 30.0, 1300, 64).eta() == "216 min 40 s of training left (0.10 steps/s, 6 img/s)"
