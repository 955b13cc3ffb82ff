"""GlobalBatchNorm on gloo ranks equals nn.BatchNorm on the concatenated batch in one process: outputs, input and
parameter gradients, running statistics (any momentum), groups of ranks, memory formats and autocast, eval mode,
no affine and no running statistics, torch.compile; in one process it is nn.BatchNorm, and its multi-rank path runs
on a device without host syncs. (Conversion of a network and DDP training: test_global_bn_model.py.)"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from tests.trainer.global_bn_cases import (
    C,
    assert_equal_to_reference,
    full_batch,
    init_layer,
    rank_rows,
    reference,
    run_steps,
    spec,
)
from trainer import global_bn
from trainer.global_bn import GlobalBatchNorm


def forbid_collectives():
    """From here on a collective of this module fails the test (eval mode must not communicate)."""
    def refuse(*args, **kwargs):
        raise AssertionError("GlobalBatchNorm communicated in eval mode")
    global_bn._all_reduce_sum = refuse


def _rank_global_bn(rank: int, world_size: int, s: dict) -> dict:
    group = None
    if s["group_size"]:  # every rank creates every group, in the same order, and keeps its own
        groups = [dist.new_group(list(range(i, i + s["group_size"]))) for i in range(0, world_size, s["group_size"])]
        group = groups[rank // s["group_size"]]
    layer = init_layer(GlobalBatchNorm(C, group=group))
    out = run_steps(layer, s, rank_rows(s, rank), s["dtype"], before_eval=forbid_collectives)
    out["memory_format_kept"] = [y.is_contiguous(memory_format=torch.channels_last) for y in out["y"]]
    return out


@pytest.mark.parametrize("s", [
    pytest.param(spec(), id="2d-2ranks"),
    pytest.param(spec(sizes=(8,) * 4), id="2d-4ranks"),
    pytest.param(spec(dims=2), id="1d-NC-2ranks"),
    pytest.param(spec(dims=3, sizes=(8,) * 4), id="1d-NCL-4ranks"),
    pytest.param(spec(dims=5, sizes=(3, 3)), id="3d-2ranks"),
    pytest.param(spec(sizes=(5, 3)), id="unequal-batches"),
])
def test_equals_batchnorm_on_concatenated_batch(distributed_run, s):
    results = distributed_run(_rank_global_bn, len(s["sizes"]), s)
    assert_equal_to_reference(s, results)


def test_per_rank_batchnorm_would_differ():
    """The comparison above can fail: nn.BatchNorm on one rank's slice is not the concatenated batch's."""
    s = spec()
    ref, local = reference(s, [0, 1]), run_steps(init_layer(nn.BatchNorm2d(C)), s, rank_rows(s, 0))
    assert not torch.allclose(local["y"][0], ref["y"][0][:8], atol=1e-3)
    assert not torch.allclose(local["running"][1], ref["running"][1], atol=1e-3)


def test_groups_of_two_among_four_ranks(distributed_run):
    s = spec(sizes=(8,) * 4, group_size=2)
    results = distributed_run(_rank_global_bn, 4, s)
    assert_equal_to_reference(s, results)
    everyone = reference(s, [0, 1, 2, 3])  # the all-ranks result is a different one
    assert not torch.allclose(results[0]["y"][0], everyone["y"][0][:8], atol=1e-3)
    assert not torch.allclose(results[2]["running"][0], everyone["running"][0], atol=1e-3)


@pytest.mark.parametrize("momenta", [(None, None, None), (0.1, 0.0, 1.0), (1.0, 0.5, 0.0)])
def test_momentum_read_at_every_call(distributed_run, momenta):
    """None: cumulative average; 0.0: statistics kept; 1.0: exactly this batch's; changed between calls."""
    s = spec(momenta=momenta)
    results = distributed_run(_rank_global_bn, 2, s)
    assert_equal_to_reference(s, results)


def test_channels_last_and_bf16_autocast(distributed_run):
    s = spec(channels_last=True, dtype=torch.bfloat16)
    results = distributed_run(_rank_global_bn, 2, s)
    for got in results:
        assert all(got["memory_format_kept"]), "the output lost the input's channels_last format"
        assert got["y"][0].dtype == torch.bfloat16 and got["grad_x"][0].dtype == torch.bfloat16
        assert got["grad_w"][0].dtype == torch.float32 and got["running"][0].dtype == torch.float32
    # statistics and parameter gradients in fp32 from bf16 values: tight; outputs and input gradients: bf16 rounding
    assert_equal_to_reference(s, results, tol=1e-5, low_tol=2e-2)


def test_channels_last_fp32(distributed_run):
    s = spec(channels_last=True)
    results = distributed_run(_rank_global_bn, 2, s)
    assert all(all(got["memory_format_kept"]) for got in results)
    assert_equal_to_reference(s, results)


def test_one_process_is_batchnorm_exactly():
    """Without a process group: nn.BatchNorm's own forward (bit for bit), momentum None included."""
    for momenta in [(0.1, 0.1, 0.1), (None, None, None), (0.1, 0.0, 1.0)]:
        s = spec(momenta=momenta)
        got = run_steps(init_layer(GlobalBatchNorm(C)), s, slice(0, 16))
        want = run_steps(init_layer(nn.BatchNorm2d(C)), s, slice(0, 16))
        for key in ("y", "grad_x", "grad_w", "grad_b", "running"):
            for a, b in zip(got[key], want[key]):
                assert torch.equal(a, b), (momenta, key)
        assert torch.equal(got["y_eval"], want["y_eval"])


def test_input_dims_checked():
    layer = GlobalBatchNorm(C)
    for shape in [(C,), (2, C, 2, 2, 2, 2)]:
        with pytest.raises(ValueError, match="expected a 2D to 5D input"):
            layer(torch.randn(shape))


def _rank_compiled(rank: int, world_size: int) -> dict:
    s = spec()
    layer = init_layer(GlobalBatchNorm(C))
    x_full, r_full = full_batch(s, 0)
    rows = rank_rows(s, rank)

    def loss_of(layer, x):
        return (layer(x) * r_full[rows]).sum()

    out = {}
    for name, fn in (("eager", loss_of), ("compiled", torch.compile(loss_of, fullgraph=True, backend="aot_eager"))):
        model = copy.deepcopy(layer)
        x = x_full[rows].clone().requires_grad_()
        loss = fn(model, x)
        loss.backward()
        out[name] = [loss.detach(), x.grad, model.weight.grad, model.running_var.clone()]
    return out


@pytest.mark.slow
def test_compiled_fullgraph_equals_eager(distributed_run):
    """torch.compile traces the layer with its collective in one graph (fullgraph=True: a graph break fails),
    forward and backward equal to eager on 2 gloo ranks."""
    for out in distributed_run(_rank_compiled, 2, timeout_s=600):
        for got, want in zip(out["compiled"], out["eager"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_global_path_on_device_without_host_syncs(monkeypatch, device):
    """The multi-rank code path in one process (a pretended 2-rank group whose all-reduce is the identity, so the
    statistics are this batch's): bf16 autocast, channels_last, momentum None, affine or not, equal to nn.BatchNorm2d
    in fp32 on the same values; on CUDA under torch.cuda.set_sync_debug_mode("error"), which fails on a host sync."""
    monkeypatch.setattr(global_bn, "_group_size", lambda group: 2)
    monkeypatch.setattr(global_bn, "_all_reduce_sum", lambda tensor, group: tensor * 1)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(16, C, 6, 6, generator=g) * 2 + 1).bfloat16()
    r = torch.randn(16, C, 6, 6, generator=g).bfloat16()
    for affine in (True, False):
        want_layer = nn.BatchNorm2d(C, momentum=None, affine=affine)
        layer = GlobalBatchNorm(C, momentum=None, affine=affine).to(device)
        want_x = x.float().requires_grad_()
        want_y = want_layer(want_x)
        (want_y * r.float()).sum().backward()
        got_x = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast(device, dtype=torch.bfloat16):
                y = layer(got_x)
            (y.float() * r.to(device)).sum().backward()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.float().cpu(), want_y.detach(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got_x.grad.float().cpu(), want_x.grad, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(layer.running_var.cpu(), want_layer.running_var, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_mean.cpu(), want_layer.running_mean, atol=1e-5, rtol=1e-5)
        if affine:
            torch.testing.assert_close(layer.weight.grad.cpu(), want_layer.weight.grad, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(layer.bias.grad.cpu(), want_layer.bias.grad, atol=1e-4, rtol=1e-5)


def _rank_plain(rank: int, world_size: int) -> dict:
    s = spec()
    layer = GlobalBatchNorm(C, affine=False, track_running_stats=False)
    x_full, r_full = full_batch(s, 0)
    rows = rank_rows(s, rank)
    x = x_full[rows].clone().requires_grad_()
    y = layer(x)
    (y * r_full[rows]).sum().backward()
    layer.eval()  # no running statistics: eval normalizes with this rank's own batch, as nn.BatchNorm does
    return {"y": y.detach(), "grad_x": x.grad, "y_eval": layer(x.detach())}


def test_no_affine_no_running_statistics(distributed_run):
    s = spec()
    results = distributed_run(_rank_plain, 2)
    x_full, r_full = full_batch(s, 0)
    x = x_full.clone().requires_grad_()
    want = nn.BatchNorm2d(C, affine=False, track_running_stats=False)
    y = want(x)
    (y * r_full).sum().backward()
    for rank, got in enumerate(results):
        rows = rank_rows(s, rank)
        torch.testing.assert_close(got["y"], y.detach()[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["grad_x"], x.grad[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["y_eval"], want(x_full[rows]), atol=1e-5, rtol=1e-5)
