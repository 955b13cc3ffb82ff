"""Whole runs through the entry point: exact resume, non-finite loss, and torchrun with 2 processes end to end."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.config_load import load_config
from trainer.main import main
from trainer.model import build_model

REPO = Path(__file__).parents[2]
# resnet8, a fifth of the quickstart's resnet10 FLOPs: what these tests check does not depend on the network
TINY = ["--config", str(REPO / "configs/quickstart.yaml"), "dataset.name=synthetic", "dataset.synthetic_size=96",
        "dataset.input_shape=(16,16,3)", "model.base_model=resnet8", "model.small_stem=true", "model.out_dim=16",
        "batch_size=16", "epochs=2", "log_every_n_steps=2", "eval.final_probe=false", "eval.knn_monitor=false",
        "amp=off", "optim.warmup_epochs=1"]


def final_state(output_dir):
    state, _ = checkpoint.load_latest(output_dir)
    return state


def train_intervals(output_dir) -> dict:
    """metrics.jsonl's train records keyed by the steps each one averages over: (previous logged step, step]."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    steps = [0] + [r["step"] for r in train]
    assert steps == sorted(set(steps)), steps  # each step logged once, in order (a resume rewrites none twice)
    return {(start, r["step"]): r for start, r in zip(steps, train)}


def test_resume_is_bitwise_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*TINY, f"output_dir={straight}"]) == 0
    total = final_state(straight)["step"]
    assert total >= 6
    assert main([*TINY, f"output_dir={split}", f"max_steps={total // 2 + 1}"]) == 0  # stops mid-epoch
    assert final_state(split)["step"] == total // 2 + 1
    assert main([*TINY, f"output_dir={split}"]) == 0  # the same command again resumes
    a, b = final_state(straight), final_state(split)
    assert a["step"] == b["step"] == total
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # the log after the resume: where the two runs averaged over the same steps, the same numbers (the first part
    # ends at an interval of its own, the stop step, and the resumed part's first interval starts there)
    straight_log, split_log = train_intervals(straight), train_intervals(split)
    same = sorted(straight_log.keys() & split_log.keys())
    assert same[0][0] == 0 and same[-1][1] == total and len(same) >= 3, same
    for interval in same:
        for key in ("loss", "contrastive_top1", "lr"):
            assert split_log[interval][key] == straight_log[interval][key], (interval, key)


def test_non_finite_loss_stops_naming_the_step_and_keeps_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    sgd = ["optim.name=sgd", "optim.warmup_epochs=0"]
    assert main([*TINY, *sgd, f"output_dir={out}", "max_steps=2", "optim.base_lr=0.01"]) == 0
    before = {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(out)}
    code = main([*TINY, *sgd, f"output_dir={out}", "optim.base_lr=1e30", "log_every_n_steps=1",
                 "checkpoint_every_n_steps=1"])
    assert code == 3
    assert "non-finite at step" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(out)} == before


def test_config_error_exits_before_anything_starts(tmp_path, capsys):
    assert main([f"output_dir={tmp_path / 'x'}", "batch_size=7", "loss.temperture=1"]) == 2
    assert "loss.temperture" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.main",
           "--config", "configs/quickstart.yaml", f"output_dir={out}", "max_steps=4", "batch_size=32",
           "log_every_n_steps=2", "dataset.input_shape=(16,16,3)", "eval.final_probe=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    state = torch.load(checkpoint.list_checkpoints(out)[-1], weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2
    # both ranks end with the checkpoint's weights: each prints the sum of its parameters, recomputed here from
    # the checkpoint (DDP keeps the ranks equal; a rank that trained alone would print another sum)
    cfg = load_config(out / "config.yaml")
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    expected = float(sum(p.detach().double().sum() for p in model.parameters()))
    printed = re.findall(r"\[rank (\d)\] step 4: parameter checksum (\S+)", proc.stdout)
    assert sorted(rank for rank, _ in printed) == ["0", "1"]
    assert all(float(value) == pytest.approx(expected, rel=1e-11) for _, value in printed)
    # TensorBoard and metrics.jsonl hold the same losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    logged = {step: r["loss"] for (_, step), r in train_intervals(out).items()}
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == \
        [(step, round(loss, 4)) for step, loss in logged.items()] and list(logged) == [2, 4]


@pytest.mark.slow
def test_torchrun_two_processes_on_a_prepared_beton(tmp_path):
    if importlib.util.find_spec("ffcv") is None:
        raise AssertionError("FFCV is missing: the test command installs it (bash launch/install.sh --ffcv)")
    beton = tmp_path / "digits.beton"
    prep = subprocess.run([sys.executable, "-m", "data.prepare", "--dataset", "digits", "--out", str(beton),
                           "--num-workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.main",
           "--config", "configs/quickstart.yaml", f"output_dir={out}", "dataset.loader=ffcv", f"dataset.path={beton}",
           "dataset.num_workers=1", "max_steps=3", "batch_size=32", "log_every_n_steps=1", "eval.final_probe=false"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(checkpoint.list_checkpoints(out)[-1], weights_only=True)["step"] == 3
