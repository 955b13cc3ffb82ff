"""Model: backbone without fc, small-image stem, projection head shape, SyncBN group layout."""
import pytest
import torch
import torch.nn as nn

from trainer.config import ModelConfig
from trainer.model import build_model, sync_batchnorm_groups


@pytest.mark.parametrize("base_model,feature_dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_features_and_head(base_model, feature_dim):
    model = build_model(ModelConfig(base_model=base_model, out_dim=32, head_layers=3))
    x = torch.randn(4, 3, 32, 32)
    assert model.backbone(x).shape == (4, feature_dim) and model.feature_dim == feature_dim
    assert model(x).shape == (4, 32)
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [feature_dim, feature_dim, 32]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.head) == 2
    assert not any(name.startswith("backbone.fc.") for name, _ in model.named_parameters())


def test_small_stem_keeps_resolution():
    small = build_model(ModelConfig(small_stem=True)).backbone
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    feats = {}
    def record(module, inputs, output):
        feats["small"] = output.shape

    small.layer4.register_forward_hook(record)
    small(torch.randn(1, 3, 32, 32))
    assert feats["small"][-1] == 4  # 32 / 8: only the three stride-2 stages downsample


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
