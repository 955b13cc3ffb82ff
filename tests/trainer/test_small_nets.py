"""Small backbones: shapes and stems, seeded init (the random-init row rebuilds it), the work they save, training."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import ConfigError, ModelConfig
from trainer.model import build_backbone, build_model, enable_activation_checkpointing
from trainer.small_nets import SmallResNet


@pytest.mark.parametrize("name,feature_dim", [("resnet8", 128), ("resnet8_wide", 256)])
@pytest.mark.parametrize("small_stem,size,final_side", [(True, 16, 4), (True, 8, 2), (False, 32, 2)])
def test_features_and_resolution(name, feature_dim, small_stem, size, final_side):
    net, dim = build_backbone(name, small_stem)
    assert dim == feature_dim
    seen = {}
    net.layer3.register_forward_hook(lambda module, inputs, output: seen.update(shape=output.shape))
    assert net(torch.randn(3, 3, size, size)).shape == (3, feature_dim)
    # small stem: only the two stride-2 blocks downsample; torchvision's stem divides by 4 first
    assert seen["shape"] == (3, feature_dim, final_side, final_side)


def test_same_seed_same_network():
    """trainer.eval rebuilds the random-init backbone from the run's seed: the build must depend on it alone."""
    torch.manual_seed(3)
    a, _ = build_backbone("resnet8", True)
    torch.manual_seed(3)
    b, _ = build_backbone("resnet8", True)
    torch.manual_seed(4)
    c, _ = build_backbone("resnet8", True)
    for (key, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), key
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_torchvision_initialization():
    torch.manual_seed(0)
    net = SmallResNet((64, 128, 256))
    conv = net.layer3[0].conv2  # 256 -> 256, 3x3: Kaiming normal with fan_out = 256 * 9
    expected_std = (2.0 / (256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)


def _forward_flops(net: nn.Module, size: int) -> int:
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(2, 3, size, size))
    return counter.get_total_flops()


def test_resnet8_is_a_small_fraction_of_resnet18_work():
    """The quickstart's premise: at 16 px resnet8 costs under a tenth of ResNet-18's convolutions (FLOPs
    counted by torch, not timed) and resnet8_wide about four times resnet8 (twice the width)."""
    flops = {name: _forward_flops(build_backbone(name, True)[0].eval(), 16)
             for name in ("resnet8", "resnet8_wide", "resnet18")}
    assert flops["resnet8"] < flops["resnet18"] / 10
    assert 3.5 < flops["resnet8_wide"] / flops["resnet8"] < 4.5


def test_config_accepts_the_names_and_a_step_updates_every_weight():
    model = build_model(ModelConfig(base_model="resnet8", small_stem=True, out_dim=16))
    assert model.feature_dim == 128
    model(torch.randn(8, 3, 16, 16)).pow(2).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    with pytest.raises(ConfigError, match="resnet8"):  # the error lists the small names among the choices
        ModelConfig(base_model="resnet9")


def test_activation_checkpointing_gives_the_same_gradients():
    """The stages carry torchvision's names, so step_mode=checkpoint and the planner find them."""
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        net, _ = build_backbone("resnet8", True)
        if checkpointed:
            enable_activation_checkpointing(net)
            assert type(net.layer1).__name__ == "CheckpointedSequential"
        net(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
