"""LARS against its formula written out by hand; optimizer groups; the warmup + cosine schedule."""
import math

import pytest
import torch
import torch.nn as nn

from trainer.config import OptimConfig
from trainer.optim import LARS, build_optimizer, lr_at, param_groups


def test_lars_first_step_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w.grad, b.grad = gw.clone(), gb.clone()
    lr, wd, eta = 0.7, 0.01, 0.001
    LARS([w, b], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta).step()

    d = gw + wd * w0
    trust = eta * w0.norm() / d.norm()
    torch.testing.assert_close(w.detach(), w0 - lr * trust * d, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), b0 - lr * gb, rtol=1e-6, atol=1e-7)  # ndim < 2: plain SGD, no decay


def test_lars_momentum_accumulates_scaled_steps():
    w = torch.ones(2, 2, requires_grad=True)
    opt = LARS([w], lr=1.0, momentum=0.5, weight_decay=0.0, trust_coefficient=1.0)
    w.grad = torch.full((2, 2), 2.0)
    opt.step()  # trust = |w|/|g| = 2/4: v1 = 0.5 * g = 1.0 each; w = 0
    torch.testing.assert_close(w.detach(), torch.zeros(2, 2))
    w.grad = torch.full((2, 2), 2.0)
    opt.step()  # |w| = 0 -> trust 1: v2 = 0.5 * 1 + 2 = 2.5; w = -2.5
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -2.5))


def test_lars_zero_gradient_keeps_weights():
    w = torch.randn(3, 3, requires_grad=True)
    before = w.detach().clone()
    w.grad = torch.zeros(3, 3)
    LARS([w], lr=1.0, weight_decay=0.0).step()
    torch.testing.assert_close(w.detach(), before)


def test_param_groups_exclude_biases_and_norms_from_decay():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decay, no_decay = param_groups(model, 1e-4)
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 1e-4
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(name=name), peak_lr=0.1)
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.1


def test_lr_scaling_from_global_batch():
    assert OptimConfig(base_lr=0.3, lr_scaling="linear").peak_lr(4096) == pytest.approx(4.8)
    assert OptimConfig(base_lr=0.075, lr_scaling="sqrt").peak_lr(4096) == pytest.approx(4.8)
    assert OptimConfig(base_lr=3e-4, lr_scaling="none").peak_lr(4096) == pytest.approx(3e-4)
    # unset base_lr: the paper's value for the chosen scaling (4.8 at batch 4096 either way)
    assert OptimConfig(lr_scaling="linear").peak_lr(4096) == pytest.approx(4.8)
    assert OptimConfig(lr_scaling="sqrt").peak_lr(4096) == pytest.approx(4.8)


def test_schedule_values():
    peak, total, warmup = 4.8, 1000, 100
    assert lr_at(0, total, warmup, peak) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, total, warmup, peak) == pytest.approx(peak)  # end of warmup
    assert lr_at(warmup, total, warmup, peak) == pytest.approx(peak)  # cosine starts at the peak
    mid = warmup + (total - warmup) // 2
    assert lr_at(mid, total, warmup, peak) == pytest.approx(peak / 2)
    last = lr_at(total - 1, total, warmup, peak, final_lr=0.0)
    assert last == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))))
    assert 0 < last < 1e-3 * peak
    assert lr_at(total - 1, total, 0, 1.0, final_lr=0.1) > 0.1
    values = [lr_at(s, total, warmup, peak) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # cosine is monotone after warmup
