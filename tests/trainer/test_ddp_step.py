"""One DDP + LARS training step on 2 gloo ranks equals one process on the concatenated batch."""
import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.loss import NTXentLoss
from trainer.optim import LARS, param_groups
from trainer.step import train_step


def small_model():
    torch.manual_seed(0)  # same init on every rank and in the reference
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 8))


def make_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)


def step(model, x1, x2, steps=1):
    opt = LARS(param_groups(model, 1e-4), lr=2.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for _ in range(steps):
        losses.append(train_step(model, NTXentLoss(0.2), opt, scaler, x1, x2, amp_dtype=None)[0])
    return losses


def _rank_step(rank, world_size, steps):
    x1, x2 = make_batch()
    n = x1.shape[0] // world_size
    model = small_model()
    ddp = DDP(model)
    losses = step(ddp, x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n], steps)
    return [p.detach().clone() for p in model.parameters()], torch.stack(losses)


@pytest.mark.parametrize("steps", [1, 3])
def test_two_rank_ddp_lars_step_equals_single_process(distributed_run, steps):
    results = distributed_run(_rank_step, 2, steps)
    reference = small_model()
    x1, x2 = make_batch()
    ref_losses = torch.stack(step(reference, x1, x2, steps))
    before = [p.detach().clone() for p in small_model().parameters()]
    for rank_params, _ in results:
        for got, want, init in zip(rank_params, reference.parameters(), before):
            assert not torch.equal(want.detach(), init)  # the step really moved the weights
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((results[0][1] + results[1][1]) / 2, ref_losses, atol=1e-5, rtol=1e-5)
