"""Model: the backbone is torchvision's ResNet without fc (small stem: a stride-1 3x3 conv, no max-pool), the
projection head the SimCLR MLP, SyncBN group layout, and fine_tune_from's backbone weights in build_network."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from trainer import checkpoint
from trainer.config import ModelConfig
from trainer.config_load import load_config
from trainer.distributed import DistContext
from trainer.export import export_backbone
from trainer.model import build_model, build_network, sync_batchnorm_groups


def torchvision_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What torchvision's own forward feeds its fc layer: the pooled features, by a hook on fc's input."""
    seen = {}
    handle = net.fc.register_forward_hook(lambda module, inputs, output: seen.update(h=inputs[0]))
    net(x)
    handle.remove()
    return seen["h"]


def mlp_by_hand(h: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """SimCLR's projection head written out: (x W^T -> batch-normalize with the batch's biased variance ->
    scale, shift -> ReLU) per hidden layer, then x W^T + b."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    norms = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    x = h
    for linear, norm in zip(linears[:-1], norms):
        x = x @ linear.weight.T
        x = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + norm.eps) * norm.weight + norm.bias
        x = x.clamp_min(0)
    return x @ linears[-1].weight.T + linears[-1].bias


@pytest.mark.parametrize("base_model,feature_dim,head_layers", [("resnet18", 512, 3), ("resnet50", 2048, 2)])
def test_backbone_is_torchvisions_resnet_and_head_the_simclr_mlp(base_model, feature_dim, head_layers):
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_model=base_model, out_dim=32, head_layers=head_layers))
    reference = getattr(torchvision.models, base_model)()
    missing, unexpected = reference.load_state_dict(model.backbone.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []  # every backbone tensor, no fc
    x = torch.randn(2, 3, 32, 32)
    h = model.backbone(x)
    assert model.feature_dim == feature_dim
    torch.testing.assert_close(h, torchvision_features(reference, x))
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == \
        [(feature_dim, feature_dim)] * (head_layers - 1) + [(feature_dim, 32)]
    assert all(m.bias is None for m in linears[:-1])  # BatchNorm follows: a bias there would be dead weight
    torch.testing.assert_close(model(x), mlp_by_hand(h, model.head), atol=1e-5, rtol=1e-4)


def test_small_stem_is_a_stride_one_3x3_conv_without_max_pool():
    """The CIFAR-size stem of the SimCLR paper: what layer1 receives is relu(bn(conv3x3(x))) at full resolution,
    computed here with torch's functional ops; only the three stride-2 stages downsample after it."""
    torch.manual_seed(0)
    small = build_model(ModelConfig(small_stem=True)).backbone
    seen = {}
    small.layer1.register_forward_hook(lambda module, inputs, output: seen.update(stem=inputs[0]))
    small.layer4.register_forward_hook(lambda module, inputs, output: seen.update(last=output))
    x = torch.randn(2, 3, 32, 32)
    small(x)
    bn = small.bn1
    by_hand = F.relu(F.batch_norm(F.conv2d(x, small.conv1.weight, stride=1, padding=1), None, None, bn.weight,
                                  bn.bias, training=True, eps=bn.eps))
    torch.testing.assert_close(seen["stem"], by_hand)
    assert seen["last"].shape[-2:] == (4, 4)  # 32 / 8


def test_sync_bn_groups():
    assert sync_batchnorm_groups(8, 0) == [list(range(8))]
    assert sync_batchnorm_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sync_batchnorm_groups(4, 8) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="sync_bn_group_size=3"):
        sync_batchnorm_groups(8, 3)


def test_activation_checkpointing_same_gradients_and_bn_statistics():
    from trainer.model import enable_activation_checkpointing

    torch.manual_seed(0)
    plain = build_model(ModelConfig(small_stem=True, out_dim=8))
    ckpt = build_model(ModelConfig(small_stem=True, out_dim=8))
    ckpt.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(ckpt.backbone)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 16, 16)
    for model in (plain, ckpt):
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, msg=name)  # running stats advanced once, not twice


def _group_sums(rank, world_size, group_size):
    import torch.distributed as dist

    from trainer.model import new_sync_batchnorm_group

    group = new_sync_batchnorm_group(world_size, rank, group_size)
    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=group)  # what SyncBatchNorm's statistics reduction spans
    return value.item()


def test_one_bn_group_is_the_default_group(monkeypatch):
    """Groups covering every rank reduce over the default group: no second communicator duplicating WORLD."""
    import torch.distributed as dist

    from trainer.model import new_sync_batchnorm_group

    made = []
    monkeypatch.setattr(dist, "new_group", lambda ranks: made.append(ranks) or object())
    assert new_sync_batchnorm_group(8, 3, 0) is None and new_sync_batchnorm_group(8, 3, 8) is None
    assert made == []
    new_sync_batchnorm_group(8, 3, 4)
    assert made == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_sync_bn_groups_reduce_within_k_ranks(distributed_run):
    assert distributed_run(_group_sums, 4, 2) == [1.0, 1.0, 5.0, 5.0]  # {0,1} and {2,3}
    assert distributed_run(_group_sums, 4, 0) == [6.0] * 4  # the whole world


# ----------------------------------------------------------------------------- fine_tune_from
TINY = ["model.base_model=resnet8", "model.small_stem=true", "model.out_dim=16", "dataset.name=synthetic",
        "seed=3"]


class _RecordingLog:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(("info", message))

    def warn(self, message):
        self.lines.append(("warn", message))


def _built(rank, world_size, sources):
    """build_network (DDP needs a process group: one gloo rank) once per fine_tune_from value: the model's
    weights and what it logged."""
    built = []
    for source in sources:
        cfg = load_config(None, [*TINY, f"fine_tune_from={source}"])
        log = _RecordingLog()
        model, _ = build_network(cfg, DistContext(rank, rank, world_size, torch.device("cpu"), "gloo"), log)
        built.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, log.lines))
    return built


def seeded_init() -> dict:
    """The weights build_network starts from without fine_tune_from (seed 3)."""
    torch.manual_seed(3)
    return build_model(load_config(None, TINY).model).state_dict()


@pytest.fixture
def pretrained(tmp_path, monkeypatch):
    """A 'pretrained' resnet8 (another seed, BN statistics as training leaves them) saved as a run under runs/
    and exported: (its backbone state_dict, every form fine_tune_from accepts)."""
    monkeypatch.chdir(tmp_path)  # the seed's form: a run name under ./runs (the forked rank inherits the folder)
    torch.manual_seed(7)
    source = build_model(load_config(None, TINY).model)
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.num_batches_tracked.fill_(9)
    run = tmp_path / "runs" / "pretrained"
    ckpt = checkpoint.save({"model": source.state_dict(), "step": 9}, run, 9, keep=1)
    export_backbone(str(run), str(tmp_path / "backbone.pt"))
    forms = {"checkpoint file": str(ckpt), "run directory": str(run), "run name under runs/": "pretrained",
             "exported backbone .pt": str(tmp_path / "backbone.pt")}
    return {k: v.clone() for k, v in source.backbone.state_dict().items()}, forms


def test_fine_tune_from_loads_the_backbone_of_every_source_form(distributed_run, pretrained):
    source, forms = pretrained
    init = seeded_init()
    for form, (weights, lines) in zip(forms, distributed_run(_built, 1, list(forms.values()))[0]):
        backbone = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        assert backbone.keys() == source.keys(), form
        for key, value in source.items():
            assert torch.equal(backbone[key], value), f"{form}: {key}"
        assert not torch.equal(backbone["conv1.weight"], init["backbone.conv1.weight"])  # not the seeded init
        for key in (k for k in init if k.startswith("head.")):  # the head is not the checkpoint's: seeded init
            assert torch.equal(weights[key], init[key]), f"{form}: {key}"
        assert lines == [("info", f"fine_tune_from={forms[form]}: backbone weights loaded")], form


def test_missing_fine_tune_source_warns_and_trains_from_scratch(distributed_run, tmp_path):
    missing = str(tmp_path / "no_such_run")
    [(weights, lines)] = distributed_run(_built, 1, [missing])[0]
    init = seeded_init()
    assert weights.keys() == init.keys()
    for key, value in init.items():
        assert torch.equal(weights[key], value), key
    [(level, message)] = lines
    assert level == "warn" and missing in message and "from scratch" in message
