"""The cached (chunked) large-batch step gives the direct step's gradients, in one process and on 2 gloo ranks."""
import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import cached_step
from trainer.cached_step import auto_chunk_size, cached_train_step, choose_chunk_size, probe_step
from trainer.loss import NTXentLoss
from trainer.step import train_step


class CaptureGrads(torch.optim.Optimizer):
    """An optimizer whose step records the gradients it was given (after DDP averaging) and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 8))


def views():
    g = torch.Generator().manual_seed(5)
    return torch.randn(12, 3, 4, 4, generator=g), torch.randn(12, 3, 4, 4, generator=g)


def grads(step_fn, model, x1, x2, **kw):
    opt = CaptureGrads(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _ = step_fn(model, NTXentLoss(0.2), opt, scaler, x1, x2, amp_dtype=None, **kw)
    return loss, opt.seen


@pytest.mark.parametrize("chunk_size", [1, 5, 24])
def test_cached_equals_direct_single_process(chunk_size):
    x1, x2 = views()
    loss_d, direct = grads(train_step, small_model(), x1, x2)
    loss_c, cached = grads(cached_train_step, small_model(), x1, x2, chunk_size=chunk_size)
    assert loss_c.item() == pytest.approx(loss_d.item(), abs=1e-6)
    for a, b in zip(direct, cached):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _rank_cached(rank, world_size):
    x1, x2 = views()
    n = x1.shape[0] // world_size
    model = DDP(small_model())
    _, seen = grads(cached_train_step, model, x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n],
                    chunk_size=4)
    return seen


def test_cached_on_two_ranks_equals_direct_full_batch(distributed_run):
    results = distributed_run(_rank_cached, 2)
    x1, x2 = views()
    _, direct = grads(train_step, small_model(), x1, x2)
    for seen in results:
        for a, b in zip(direct, seen):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def bn_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))


def test_batchnorm_running_stats_advance_once_per_sample():
    x1, x2 = views()
    direct, cached = bn_model(), bn_model()
    grads(train_step, direct, x1, x2)
    grads(cached_train_step, cached, x1, x2, chunk_size=24)  # one chunk: pass 1 must leave no trace
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(cached[2], name), getattr(direct[2], name))


@pytest.mark.parametrize("chunk_size", [5, 12])
def test_batchnorm_running_stats_advance_once_per_step_from_the_chunks(chunk_size):
    """Chunks: one momentum update per step with the size-weighted mean of the chunks' batch statistics (the
    running mean is the direct step's; the variance the mean within-chunk variance), computed here by hand."""
    x1, x2 = views()
    direct, chunked = bn_model(), bn_model()
    grads(train_step, direct, x1, x2)
    grads(cached_train_step, chunked, x1, x2, chunk_size=chunk_size)
    bn, momentum = chunked[2], chunked[2].momentum
    assert bn.num_batches_tracked.item() == 1 and momentum == 0.1
    torch.testing.assert_close(bn.running_mean, direct[2].running_mean)
    with torch.no_grad():
        hidden = bn_model()[:2](torch.cat([x1, x2]))
    pieces = hidden.split(chunk_size)
    within = sum(p.var(0, unbiased=True) * len(p) for p in pieces) / len(hidden)
    torch.testing.assert_close(bn.running_var, (1 - momentum) * torch.ones(8) + momentum * within)


def test_auto_chunk_size():
    # 0.7 x 80 GB / 50 MB = 1120 views fit: the largest power of two below is 1024
    assert auto_chunk_size(2048, bytes_per_view=50e6, free_bytes=80e9) == 1024
    assert auto_chunk_size(64, bytes_per_view=1e3, free_bytes=80e9) == 64  # the rank's views bound it
    assert auto_chunk_size(64, bytes_per_view=1e12, free_bytes=1e9) == 1  # nothing fits: one view at a time


@pytest.mark.parametrize("per_rank_views", [1, 3, 64, 96, 2048])
@pytest.mark.parametrize("bytes_per_view", [1e3, 7e6, 50e6, 1e12])
def test_auto_chunk_size_is_the_largest_power_of_two_that_fits(per_rank_views, bytes_per_view):
    """Checked against its definition, not its loop: a power of two within the rank's views whose activations
    fit in 70% of the free memory, and the next power of two would not (or one view when none fits)."""
    free = 10e9
    size = auto_chunk_size(per_rank_views, bytes_per_view, free)
    assert size >= 1 and size & (size - 1) == 0

    def fits(views: int) -> bool:
        return views <= per_rank_views and views * bytes_per_view <= 0.7 * free

    assert fits(size) or size == 1
    assert not fits(2 * size)


def _rank_bn_buffers(rank, world_size):
    """Two steps on rank-shifted data, direct and cached: this rank's BN buffers after each."""
    x1, x2 = views()
    n = x1.shape[0] // world_size
    shard = [(x[rank * n:(rank + 1) * n] + 3.0 * rank) for x in (x1, x2)]
    out = {}
    for name, step_fn, kw in (("direct", train_step, {}), ("cached", cached_train_step, {"chunk_size": 4})):
        model = DDP(bn_model())
        for _ in range(2):  # after the first step the ranks' buffers differ: DDP's broadcast then matters
            grads(step_fn, model, *shard, **kw)
        bn = model.module[2]
        out[name] = (bn.running_mean.clone(), bn.num_batches_tracked.item())
    return out


def test_cached_running_mean_equals_direct_on_every_ddp_rank(distributed_run):
    """DDP broadcasts rank 0's buffers in each step's first forward; pass 1 of the cached step must keep that
    broadcast (restoring a copy of the buffers undid it, leaving other ranks on their own averages)."""
    for out in distributed_run(_rank_bn_buffers, 2):
        torch.testing.assert_close(out["cached"][0], out["direct"][0])
        assert out["cached"][1] == out["direct"][1] == 2


def test_memory_probe_leaves_no_trace():
    """The chunk-size probe (a training forward + backward on random views) runs after a resume: BN running
    statistics, their counters, the RNG stream and the gradients must be as they were, or resume is not exact."""
    model = bn_model()
    with torch.no_grad():
        model[2].running_mean.uniform_()
        model[2].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    probe_step(model, views=6, image_size=4, device=torch.device("cpu"), amp_dtype=None)  # flattens 3x4x4 views
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def _agreed_chunk(rank, world_size):
    # rank r can afford 64 >> r views per chunk (as if each had its own free memory)
    cached_step.local_chunk_size = lambda *args: 64 >> rank
    return choose_chunk_size(0, None, 256, 32, torch.device("cpu"), None)


def test_ranks_agree_on_the_smallest_chunk_size(distributed_run):
    """Different chunk counts per rank would mean different numbers of BN collectives: a hang."""
    assert distributed_run(_agreed_chunk, 2) == [32, 32]
