"""Optimizer step time on ResNet-50's parameters: LARS (foreach) vs SGD-momentum (foreach) vs a per-parameter LARS loop.

    python -m benchmarks.optimizer [--device cpu|cuda|cuda:N] [--model resnet50] [--rounds 5]

Goal: LARS / SGD step time <= 1.3.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import add_device_argument, emit, environment, interleaved_rates, resolve_device
from trainer.config import ModelConfig
from trainer.model import build_model
from trainer.optim import LARS, param_groups


class LoopLARS(torch.optim.Optimizer):
    """The same update as trainer.optim.LARS, one parameter at a time (the usual way, for comparison)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                d = p.grad
                if p.ndim >= 2:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d * trust
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(buf)


def run(device: str = "auto", model_name: str = "resnet50", rounds: int = 5) -> dict:
    dev = resolve_device(device)
    optimizers = {}
    for name in ("lars_foreach", "sgd_momentum_foreach", "lars_per_parameter_loop"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(base_model=model_name)).to(dev)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        groups = param_groups(model, 1e-6)
        optimizers[name] = {"lars_foreach": lambda: LARS(groups, lr=0.1, weight_decay=1e-6),
                            "sgd_momentum_foreach": lambda: torch.optim.SGD(groups, lr=0.1, momentum=0.9, foreach=True),
                            "lars_per_parameter_loop": lambda: LoopLARS(groups, lr=0.1, weight_decay=1e-6)}[name]()
    rates = interleaved_rates({name: opt.step for name, opt in optimizers.items()}, 1, dev, rounds=rounds)
    step_s = {name: 1.0 / r for name, r in rates.items()}
    n_params = sum(p.numel() for p in build_model(ModelConfig(base_model=model_name)).parameters())
    return {"benchmark": "optimizer", "environment": environment(),
            "config": {"device": str(dev), "model": model_name, "parameters": n_params},
            "results": {"step_s": step_s,
                        "lars_over_sgd": step_s["lars_foreach"] / step_s["sgd_momentum_foreach"],
                        "loop_over_foreach": step_s["lars_per_parameter_loop"] / step_s["lars_foreach"],
                        "goal": "lars_over_sgd <= 1.3"}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    emit(run(args.device, args.model, args.rounds), args.out)


if __name__ == "__main__":
    main()
