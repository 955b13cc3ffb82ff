"""The branches a GPU run takes, run on the CPU: bf16 and fp16 autocast (fp16 with loss scaling and gradient
clipping), the direct and cached steps, channels_last, torch.compile and global BatchNorm on 2 ranks.

Most are whole runs through the entry point on a tiny model (fp16 is the step alone on a small MLP: CPU
convolutions in fp16 take minutes); what each asserts is what the GPU run relies on:
finite, falling losses, a loss scaler that is really on, weights in channels_last, compiled losses equal to
eager ones within tolerance, and 2 ranks equal to one process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainer.loss import NTXentLoss
from trainer.main import main
from trainer.model import ProjectionHead, SimCLRModel
from trainer.step import train_step

REPO = Path(__file__).parents[2]
DIGITS = ["--config", str(REPO / "configs/quickstart.yaml"), "model.base_model=resnet18", "model.small_stem=true",
          "model.out_dim=16", "dataset.input_shape=(16,16,3)", "batch_size=32", "epochs=1", "max_steps=12",
          "log_every_n_steps=3", "eval.final_probe=false", "eval.knn_monitor=false", "optim.warmup_epochs=0",
          "optim.name=sgd", "optim.base_lr=0.05"]


def train_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def run(output_dir: Path, *overrides: str) -> list[float]:
    assert main([*DIGITS, f"output_dir={output_dir}", *overrides]) == 0
    return train_losses(output_dir)


@pytest.mark.slow
@pytest.mark.parametrize("step_mode", ["direct", "cached", "checkpoint"])
def test_bf16_autocast_trains(tmp_path, step_mode):
    losses = run(tmp_path / "run", "amp=bf16", f"step_mode={step_mode}", "cached_chunk_size=24")
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def _fp16_model() -> nn.Module:
    torch.manual_seed(0)  # a small MLP: CPU convolutions in fp16 take minutes a step, matrix products do not
    return SimCLRModel(nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.BatchNorm1d(32), nn.ReLU()),
                       ProjectionHead(32, 8), 32)


def _fp16_views(step: int):
    g = torch.Generator().manual_seed(step % 4)
    base = torch.randn(16, 3, 4, 4, generator=g)
    return base + 0.1 * torch.randn(base.shape, generator=g), base + 0.1 * torch.randn(base.shape, generator=g)


def test_fp16_with_loss_scaling_and_clipping_trains():
    """amp=fp16 takes the GradScaler path (scale, unscale before clipping, skip on overflow) on the CPU too."""
    model = _fp16_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    losses = [train_step(model, NTXentLoss(0.2), optimizer, scaler, *_fp16_views(step), torch.float16,
                         grad_clip=0.5)[0].item() for step in range(30)]
    assert all(map(math.isfinite, losses)) and sum(losses[-4:]) < sum(losses[:4]), losses
    grads = [p.grad for p in model.parameters()]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 0.5 + 1e-4  # unscaled, clipped
    # an overflowing scale: the step is skipped (weights as they were) and the scale backs off
    before = [p.detach().clone() for p in model.parameters()]
    overflow = torch.amp.GradScaler("cpu", init_scale=3e38)  # loss x scale is inf in fp32: every gradient overflows
    train_step(model, NTXentLoss(0.2), optimizer, overflow, *_fp16_views(0), torch.float16, grad_clip=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert overflow.get_scale() < 3e38


def assert_same_run(losses: list[float], reference: list[float]) -> None:
    """The first step's loss (same weights, same batch) equal to fp32 rounding; later steps close: a different
    kernel's fp32 rounding (0.3% on the first BN layers' gradients here, 1e-14 in fp64) moves the weights apart."""
    assert len(losses) == len(reference) and all(map(math.isfinite, losses))
    assert losses[0] == pytest.approx(reference[0], rel=1e-5, abs=1e-5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=0.05, rtol=0.02)


@pytest.mark.slow
def test_channels_last_weights_and_same_losses(tmp_path):
    common = ["log_every_n_steps=1", "max_steps=6"]
    last = run(tmp_path / "last", *common, "model.channels_last=true")
    first = run(tmp_path / "first", *common, "model.channels_last=false")
    assert_same_run(last, first)
    from trainer.config_load import load_config
    from trainer.distributed import process_group, world_from_env
    from trainer.model import build_network

    cfg = load_config(None, ["model.small_stem=true", "model.channels_last=true", "device=cpu"])
    with process_group(world_from_env(), "cpu", 60) as ctx:
        model, _ = build_network(cfg, ctx, _Quiet())
    conv = model.backbone.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


class _Quiet:
    def info(self, *_):
        pass

    warn = info


@pytest.mark.slow
@pytest.mark.parametrize("step_mode", ["direct", "cached"])
def test_compiled_losses_equal_eager(tmp_path, step_mode):
    common = [f"step_mode={step_mode}", "cached_chunk_size=24", "max_steps=4", "log_every_n_steps=1"]
    eager = run(tmp_path / "eager", *common)
    compiled = run(tmp_path / "compiled", *common, "compile=true")
    assert_same_run(compiled, eager)


@pytest.mark.slow
def test_global_batchnorm_bf16_cached_on_two_ranks(tmp_path):
    """The large-batch GPU recipe's combination on 2 CPU ranks under torchrun: global BN, bf16, cached step.
    (That 2 ranks with global BN compute what one process computes on the concatenated batch is proven step by
    step in test_engine.py; here the whole run trains and both ranks end on the same weights.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.main",
           *DIGITS, f"output_dir={out}", "model.sync_bn=true", "amp=bf16", "step_mode=cached", "cached_chunk_size=8"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 views per chunk on every rank" in done.stdout
    losses = train_losses(out)
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    checksums = {line.split("checksum")[1] for line in done.stdout.splitlines() if "parameter checksum" in line}
    assert len(checksums) == 1, done.stdout[-2000:]
