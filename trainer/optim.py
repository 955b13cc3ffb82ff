"""Optimizers (LARS, SGD, Adam, AdamW) with weight-decay groups, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS as in SimCLR: layer-wise trust ratio on weights, plain momentum SGD on biases and norms.

    For a parameter w with ndim >= 2 and gradient g:  d = g + weight_decay * w;
    trust = trust_coefficient * |w| / |d| (1 where either norm is 0);  v = momentum * v + lr * trust * d;  w -= v.
    Parameters with ndim < 2 (biases, BatchNorm) get neither weight decay nor trust scaling: v = momentum * v + lr * g.
    No host syncs: the trust ratio is computed with torch.where, per-parameter work with torch._foreach_*.
    The gradients are overwritten with d during step() (zero or free them before the next backward, as usual).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or trust_coefficient < 0 or not 0 <= momentum < 1:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} "
                             f"or trust_coefficient={trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            adapted = [p for p in params if p.ndim >= 2]
            plain = [p for p in params if p.ndim < 2]
            if adapted:
                self._update(adapted, group, adapt=True)
            if plain:
                self._update(plain, group, adapt=False)
        return loss

    def _update(self, params: list, group: dict, adapt: bool) -> None:
        """v = momentum * v + lr * trust * d; w -= v. The gradient buffers serve as scratch space for d (as
        NVIDIA's LARC does): no allocation per step."""
        d = [p.grad for p in params]
        bufs = []
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(self.state[p]["momentum_buffer"])
        torch._foreach_mul_(bufs, group["momentum"])
        if adapt:
            if group["weight_decay"]:
                torch._foreach_add_(d, params, alpha=group["weight_decay"])
            w_norm = torch.stack(torch._foreach_norm(params))
            d_norm = torch.stack(torch._foreach_norm(d))
            trust = torch.where((w_norm > 0) & (d_norm > 0),
                                group["trust_coefficient"] * w_norm / d_norm.clamp_min(1e-30), torch.ones_like(w_norm))
            torch._foreach_addcmul_(bufs, d, list((trust * group["lr"]).to(d[0].dtype).unbind()))
        else:
            torch._foreach_add_(bufs, d, alpha=group["lr"])
        torch._foreach_sub_(params, bufs)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights (ndim >= 2) decay; biases and norm parameters (ndim < 2) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, peak_lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum, foreach=True)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=peak_lr, foreach=True)
    return torch.optim.AdamW(groups, lr=peak_lr, foreach=True)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): a pure function of the global step.

    Warmup: peak_lr * (step + 1) / warmup_steps for step < warmup_steps (step 0 already learns; the last
    warmup step reaches peak_lr). Then cosine from peak_lr towards final_lr over the remaining steps:
    final_lr + (peak_lr - final_lr) * 0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
