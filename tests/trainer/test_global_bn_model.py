"""GlobalBatchNorm in networks: a deep copy shares the process group and a rank outside it is refused; converting a
ResNet keeps its state and computation; DDP + LARS steps of the SimCLR model on gloo ranks equal one process on the
concatenated batch; the benchmark runs."""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.trainer.global_bn_cases import C
from trainer.config import ModelConfig
from trainer.global_bn import GlobalBatchNorm, convert_global_batchnorm
from trainer.loss import NTXentLoss
from trainer.model import build_model
from trainer.optim import LARS, param_groups
from trainer.step import train_step


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
