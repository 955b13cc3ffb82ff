"""GlobalBatchNorm on gloo ranks equals nn.BatchNorm on the concatenated batch in one process: outputs, input and
parameter gradients, running statistics (any momentum), groups of ranks, eval mode; conversion of a ResNet; DDP +
LARS steps of the SimCLR model equal to one process."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.config import ModelConfig
from trainer import global_bn
from trainer.global_bn import GlobalBatchNorm, convert_global_batchnorm
from trainer.loss import NTXentLoss
from trainer.model import build_model
from trainer.optim import LARS, param_groups
from trainer.step import train_step

C = 4
STEPS = 3  # training forwards before the running statistics are compared
BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def spec(dims=4, sizes=(8, 8), group_size=0, momenta=(0.1,) * STEPS, channels_last=False, dtype=None):
    """One experiment: input rank `dims`, per-rank batch sizes (their count is the world size), ranks per BN group
    (0: all), momentum before each training forward, memory format, autocast dtype."""
    return dict(dims=dims, sizes=tuple(sizes), group_size=group_size, momenta=tuple(momenta),
                channels_last=channels_last, dtype=dtype)


def full_batch(s: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of every rank for this step (same in every process) and a fixed tensor r: the loss
    is sum(y * r), a SUM over samples, so rank r's input gradient is a slice of the single-process one."""
    g = torch.Generator().manual_seed(100 + step)
    shape = (sum(s["sizes"]), C) + (5,) * (s["dims"] - 2)
    offset = torch.arange(C, dtype=torch.float32).view((1, C) + (1,) * (s["dims"] - 2))
    x = torch.randn(shape, generator=g) * (1 + offset) + 2 * offset - 1  # per-channel means and scales differ
    r = torch.randn(shape, generator=g)
    if s["dtype"] is not None:  # values the low-precision activation and its gradient hold exactly
        x, r = x.to(s["dtype"]).float(), r.to(s["dtype"]).float()
    return x, r


def init_layer(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
        layer.bias.copy_(0.3 * torch.randn(C, generator=g))
    return layer


def run_steps(layer: nn.Module, s: dict, rows: slice, dtype=None, before_eval=lambda: None) -> dict:
    """STEPS training forwards + backwards on rows of each step's full batch, then one eval forward."""
    out = {"y": [], "grad_x": [], "grad_w": [], "grad_b": []}
    memory_format = torch.channels_last if s["channels_last"] else torch.contiguous_format
    for step in range(STEPS):
        x_full, r_full = full_batch(s, step)
        x = x_full[rows].to(dtype or torch.float32).contiguous(memory_format=memory_format).requires_grad_()
        layer.momentum = s["momenta"][step]
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = layer(x)
        (y.float() * r_full[rows]).sum().backward()
        out["y"].append(y.detach())
        out["grad_x"].append(x.grad)
        out["grad_w"].append(layer.weight.grad.clone())
        out["grad_b"].append(layer.bias.grad.clone())
        layer.zero_grad()
    out["running"] = [layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()]
    layer.eval()
    before_eval()
    out["y_eval"] = layer(full_batch(s, STEPS)[0][rows].contiguous(memory_format=memory_format))
    return out


def rank_rows(s: dict, rank: int) -> slice:
    start = sum(s["sizes"][:rank])
    return slice(start, start + s["sizes"][rank])


def group_of(s: dict, rank: int) -> list[int]:
    world = len(s["sizes"])
    k = s["group_size"] or world
    return list(range(rank // k * k, rank // k * k + k))


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


def reference(s: dict, ranks: list[int]) -> dict:
    """nn.BatchNorm in one process on the concatenation of `ranks`' batches (fp32)."""
    rows = slice(rank_rows(s, ranks[0]).start, rank_rows(s, ranks[-1]).stop)
    return run_steps(init_layer(BN[s["dims"]](C)), s, rows)


def assert_equal_to_reference(s: dict, results: list[dict], tol: float = 1e-5, low_tol: float = 1e-5):
    """Each group's ranks against nn.BatchNorm on that group's concatenated batch. low_tol: for tensors in the
    autocast dtype (outputs and input gradients)."""
    close = dict(atol=low_tol, rtol=low_tol)
    for group in {tuple(group_of(s, r)) for r in range(len(results))}:
        ref = reference(s, list(group))
        start = rank_rows(s, group[0]).start
        for rank in group:
            got, rows = results[rank], rank_rows(s, rank)
            local = slice(rows.start - start, rows.stop - start)
            for step in range(STEPS):
                torch.testing.assert_close(got["y"][step].float(), ref["y"][step][local], **close,
                                           msg=lambda m: f"rank {rank} step {step} output: {m}")
                torch.testing.assert_close(got["grad_x"][step].float(), ref["grad_x"][step][local], **close,
                                           msg=lambda m: f"rank {rank} step {step} input gradient: {m}")
            for name, value, want in zip(("running_mean", "running_var", "num_batches_tracked"),
                                         got["running"], ref["running"]):
                torch.testing.assert_close(value, want, atol=tol, rtol=tol, msg=lambda m: f"rank {rank} {name}: {m}")
            torch.testing.assert_close(got["y_eval"].float(), ref["y_eval"][local], **close,
                                       msg=lambda m: f"rank {rank} eval output: {m}")
        for step in range(STEPS):  # the sum over the group's ranks of their parameter gradients
            for name in ("grad_w", "grad_b"):
                summed = sum(results[rank][name][step] for rank in group)
                torch.testing.assert_close(summed, ref[name][step], atol=tol, rtol=tol,
                                           msg=lambda m: f"group {group} step {step} {name}: {m}")


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


def _rank_group_handling(rank: int, world_size: int) -> dict:
    pair, single = dist.new_group([0, 1]), dist.new_group([0])
    model = nn.Sequential(nn.Conv2d(3, C, 3), GlobalBatchNorm(C, group=pair))
    copied = copy.deepcopy(model)  # a process group cannot be copied: the copy shares it
    out = {"shares_group": copied[1].group is pair, "own_weights": copied[1].weight is not model[1].weight}
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(rank))
    out["copy_equal"] = torch.equal(copied(x), model(x))
    try:
        GlobalBatchNorm(C, group=single)(torch.randn(4, C, 3, 3))
        out["outsider"] = "no error"
    except ValueError as err:
        out["outsider"] = str(err)
    return out


def test_deepcopy_shares_group_and_outsider_rank_refused(distributed_run):
    member, outsider = distributed_run(_rank_group_handling, 2)
    for out in (member, outsider):
        assert out["shares_group"] and out["own_weights"] and out["copy_equal"]
    assert member["outsider"] == "no error"  # rank 0 is the one-rank group's member: plain BatchNorm
    assert "not a member of the layer's process group" in outsider["outsider"]


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(base_model="resnet18", small_stem=True, out_dim=16))


def test_convert_resnet_keeps_state_and_computation():
    original = small_resnet()
    original.backbone.layer1[0].bn1.weight.requires_grad_(False)  # kept per parameter
    original.backbone.layer2[0].bn2.momentum, original.backbone.layer2[0].bn2.eps = None, 1e-3
    original.backbone.layer3[0].bn1.eval()
    norms = {name: m for name, m in original.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert len(norms) == 21  # 20 in ResNet-18's backbone (stem, two per block, 3 shortcuts) + 1 in the head
    converted = convert_global_batchnorm(copy.deepcopy(original))
    assert list(converted.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    modules = dict(converted.named_modules())
    for name, old in norms.items():
        new = modules[name]
        assert type(new) is GlobalBatchNorm, name
        assert (new.eps, new.momentum, new.affine, new.track_running_stats, new.training, new.weight.requires_grad) \
            == (old.eps, old.momentum, old.affine, old.track_running_stats, old.training, old.weight.requires_grad)
    shared = convert_global_batchnorm(original)  # in place: the very same tensors (an optimizer stays right)
    assert shared.backbone.bn1.weight is norms["backbone.bn1"].weight
    assert shared.backbone.bn1.running_var is norms["backbone.bn1"].running_var
    assert convert_global_batchnorm(shared).backbone.bn1 is shared.backbone.bn1  # already global: left alone

    reference = small_resnet()
    reference.backbone.layer1[0].bn1.weight.requires_grad_(False)
    reference.backbone.layer2[0].bn2.momentum, reference.backbone.layer2[0].bn2.eps = None, 1e-3
    reference.backbone.layer3[0].bn1.eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for model in (converted, reference):
        model(x).square().sum().backward()
    for (name, a), b in zip(converted.named_parameters(), reference.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0, msg=name)
    for (name, a), b in zip(converted.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name


def test_convert_keeps_dtype_and_untracked_layers():
    model = nn.Sequential(nn.BatchNorm1d(3, affine=False, track_running_stats=False),
                          nn.BatchNorm2d(3, dtype=torch.float64))
    converted = convert_global_batchnorm(model)
    assert converted[0].weight is None and converted[0].running_mean is None and not converted[0].affine
    assert converted[1].weight.dtype == torch.float64 and converted[1].running_var.dtype == torch.float64
    single = convert_global_batchnorm(nn.BatchNorm2d(3))  # a BatchNorm itself: a new module
    assert type(single) is GlobalBatchNorm


def tiny_simclr() -> nn.Module:
    torch.manual_seed(0)  # the same initialization in every rank and in the reference
    return build_model(ModelConfig(base_model="resnet8", small_stem=True, out_dim=16))


def simclr_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)


def lars_steps(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, steps: int = 3) -> torch.Tensor:
    # lr 0.2: at 2.0 the plain-SGD update of the BN parameters makes 3 steps chaotic (a 1e-6 change of the input
    # moves the weights by 3%), and no comparison at 1e-5 could mean anything; the test checks this
    opt = LARS(param_groups(model, 1e-4), lr=0.2, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return torch.stack([train_step(model, NTXentLoss(0.2), opt, scaler, x1, x2, amp_dtype=None)[0]
                        for _ in range(steps)])


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_ddp_lars(rank: int, world_size: int) -> dict:
    x1, x2 = simclr_views()
    n = x1.shape[0] // world_size
    rows = slice(rank * n, (rank + 1) * n)
    out = {}
    for name, prepare in (("global", convert_global_batchnorm), ("per_rank", lambda m: m)):
        model = prepare(tiny_simclr())
        losses = lars_steps(DDP(model), x1[rows], x2[rows])
        out[name] = state_of(model), losses
    return out


def test_ddp_global_bn_lars_steps_equal_one_process(distributed_run):
    """DDP + GlobalBatchNorm + NT-Xent + LARS, 3 steps on 2 gloo ranks == one process with nn.BatchNorm on the
    concatenated views; with per-rank BatchNorm the same run does not match (the test can fail)."""
    results = distributed_run(_rank_ddp_lars, 2)
    reference = tiny_simclr()
    initial = state_of(reference)
    x1, x2 = simclr_views()
    ref_losses = lars_steps(reference, x1, x2)
    want = state_of(reference)
    perturbed = tiny_simclr()
    lars_steps(perturbed, x1 * (1 + 1e-6), x2)
    for key, value in state_of(perturbed).items():  # well conditioned: fp32 rounding cannot move it past 1e-5
        torch.testing.assert_close(value, want[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"ill-conditioned {key}: {m}")
    for rank, out in enumerate(results):
        state, losses = out["global"]
        assert list(state) == list(want)
        for key, value in want.items():
            if key.endswith("num_batches_tracked"):
                assert torch.equal(state[key], value) and value.item() == 3, key
                continue
            assert not torch.equal(value, initial[key]), f"{key} did not move"
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
    torch.testing.assert_close((results[0]["global"][1] + results[1]["global"][1]) / 2, ref_losses,
                               atol=1e-5, rtol=1e-5)
    per_rank = results[0]["per_rank"][0]
    assert not torch.allclose(per_rank["backbone.bn1.running_var"], want["backbone.bn1.running_var"], atol=1e-4)
    assert not torch.allclose(per_rank["head.0.weight"], want["head.0.weight"], atol=1e-5)


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


def _rank_benchmark(rank: int, world_size: int) -> dict:
    from benchmarks import global_bn as bench
    return bench.run("cpu", "resnet8", image_size=8, batch=4, rounds=1)


def test_benchmark_runs(distributed_run):
    """benchmarks.global_bn on a tiny model: every case measured, the ratios reported."""
    report = distributed_run(_rank_benchmark, 1)[0]
    results = report["results"]
    assert set(results["model_images_per_s"]) == {"model_batchnorm", "model_global"}
    assert set(results["layer_images_per_s"]) == {"layer_batchnorm", "layer_global", "layer_global_arithmetic"}
    assert all(rate > 0 for rate in results["layer_images_per_s"].values())
    assert results["model_time_global_over_batchnorm"] > 0


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
