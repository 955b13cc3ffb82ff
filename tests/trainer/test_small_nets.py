"""Small backbones: torchvision's ResNet computation (both stems), seeded init (the random-init row rebuilds it),
the work they save, training."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, ResNet

from trainer.config import ConfigError, ModelConfig
from trainer.model import build_backbone, build_model, enable_activation_checkpointing
from trainer.small_nets import SmallResNet


def torchvision_reference(stages: int, small_stem: bool) -> nn.Module:
    """torchvision's own ResNet with one BasicBlock per stage (its widths 64-128-256-512), cut after `stages`
    stages, with the SimCLR paper's small stem where asked: what resnet10 (4 stages) and resnet8_wide (3) are."""
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    if small_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    for i in range(stages + 1, 5):
        setattr(net, f"layer{i}", nn.Identity())
    net.fc = nn.Linear(64 * 2 ** (stages - 1), 10)  # fc sized to the last stage kept (its output is not compared)
    return net


def pooled_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward up to its fc layer (a hook on fc's input)."""
    seen = {}
    net.fc.register_forward_hook(lambda module, inputs, output: seen.update(h=inputs[0]))
    net(x)
    return seen["h"]


@pytest.mark.parametrize("name,stages,feature_dim,small_stem,size", [
    ("resnet10", 4, 512, True, 16), ("resnet10", 4, 512, False, 32),
    ("resnet8_wide", 3, 256, True, 8), ("resnet8_wide", 3, 256, False, 32)])
def test_same_network_as_torchvisions_resnet(name, stages, feature_dim, small_stem, size):
    """Loaded with the same weights, the small network computes what torchvision's ResNet computes (every
    tensor in its place: same names, shapes, strides, shortcuts); only fc is torchvision's own."""
    torch.manual_seed(0)
    net, dim = build_backbone(name, small_stem)
    reference = torchvision_reference(stages, small_stem)
    missing, unexpected = reference.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    x = torch.randn(3, 3, size, size)
    features = net(x)
    assert dim == feature_dim and features.shape == (3, feature_dim)
    torch.testing.assert_close(features, pooled_features(reference, x))


def test_resnet8_is_resnet8_wide_at_half_the_width():
    """resnet8 has no torchvision counterpart (torchvision's BasicBlock ResNets start at 64 channels): the same
    tensors as resnet8_wide (checked against torchvision above), each channel count halved."""
    narrow, wide = build_backbone("resnet8", True)[0].state_dict(), build_backbone("resnet8_wide", True)[0].state_dict()
    assert list(narrow) == list(wide)
    for key, tensor in wide.items():
        halved = tuple(d if (i == 1 and tensor.shape[1] == 3) else d // 2 for i, d in enumerate(tensor.shape[:2]))
        assert tuple(narrow[key].shape) == halved + tuple(tensor.shape[2:]), key  # the RGB input stays 3


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
        if key.endswith("conv1.weight") or key.endswith("conv2.weight") or key.endswith("downsample.0.weight"):
            assert not torch.equal(x, z), key  # every random tensor comes from the seed (BN's are constants)


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
