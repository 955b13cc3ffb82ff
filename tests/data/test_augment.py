"""Batched device augmentations against torchvision's functional ops, per sample, on real photographs."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from sklearn.datasets import load_sample_image

from data import augment as A


@pytest.fixture(scope="module")
def photos():
    """Eight distinct 64x64 crops of scikit-learn's sample photographs, float in [0, 1]."""
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        img = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1)
        crops += [img[:, 30 + 70 * i:94 + 70 * i, 40 + 90 * i:104 + 90 * i] for i in range(4)]
    return torch.stack(crops).float() / 255


def per_sample(op, images, factors):
    return torch.stack([op(img, float(f)) for img, f in zip(images, factors)])


FACTORS = torch.tensor([0.2, 0.6, 0.9, 1.0, 1.2, 1.5, 1.8, 0.45])


@pytest.mark.parametrize("mine,reference", [(A.adjust_brightness, TF.adjust_brightness),
                                            (A.adjust_contrast, TF.adjust_contrast),
                                            (A.adjust_saturation, TF.adjust_saturation)])
def test_linear_color_ops_match_torchvision(photos, mine, reference):
    torch.testing.assert_close(mine(photos, FACTORS), per_sample(reference, photos, FACTORS), atol=2e-4, rtol=0)


def test_hue_matches_torchvision_including_gray_and_tied_pixels(photos):
    x = photos.clone()
    x[0, :, :8] = 0.5  # achromatic pixels
    x[1, 1] = x[1, 0]  # R == G
    x[2, 2] = x[2, 1]  # G == B
    hue = torch.tensor([-0.5, -0.2, -0.05, 0.0, 0.05, 0.1, 0.2, 0.45])
    torch.testing.assert_close(A.adjust_hue(x, hue), per_sample(TF.adjust_hue, x, hue), atol=1e-5, rtol=0)


def test_grayscale_blur_solarize_match_torchvision(photos):
    torch.testing.assert_close(A.to_grayscale(photos), TF.rgb_to_grayscale(photos, 3), atol=2e-4, rtol=0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.3, 0.8, 1.9])
    blurred = torch.stack([TF.gaussian_blur(img, [7, 7], [float(s)] * 2) for img, s in zip(photos, sigma)])
    torch.testing.assert_close(A.gaussian_blur(photos, sigma, 7), blurred, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.solarize(photos), TF.solarize(photos, 0.5), atol=0, rtol=0)


def test_resized_crop_matches_torchvision_bilinear(photos):
    images = (photos * 255).round().to(torch.uint8)
    boxes = torch.tensor([[3, 5, 40, 30], [0, 0, 64, 64], [10, 20, 12, 20], [1, 2, 16, 16],
                          [30, 30, 34, 34], [5, 0, 50, 64], [20, 10, 24, 30], [0, 32, 64, 32]])
    mine = A.resized_crops(images, boxes, 32)
    ref = torch.stack([TF.resized_crop(img.float(), *b.tolist(), [32, 32], antialias=True)
                       for img, b in zip(images, boxes)])
    # the same geometry; when shrinking, roi_align averages a grid of bilinear samples per output pixel
    # where torchvision's antialiased kernel is a wider triangle: stated tolerance 6/255 mean per crop
    assert (mine - ref).abs().mean(dim=(1, 2, 3)).max() < 6.0
    # crops smaller than 32: pure bilinear on both sides; at the first and last rows and columns roi_align reads the real
    # neighbouring pixel where torchvision (cropping first) repeats the edge, so the interior is compared
    upscale = [2, 3, 4]
    torch.testing.assert_close(mine[upscale][..., 1:-1, 1:-1], ref[upscale][..., 1:-1, 1:-1], atol=1.0, rtol=0)


def test_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = A.crop_boxes(4000, 96, 96, g, torch.device("cpu"), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 96).all() and (left + w <= 96).all()
    area = h * w / 96 ** 2
    assert area.min() >= 0.07 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.7 and aspect.max() <= 1.45  # 3/4..4/3 up to rounding of small boxes
    assert area.std() > 0.2 and top.float().std() > 5  # spread, not a constant box


def test_fallback_center_crop_for_impossible_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = A.crop_boxes(8, 10, 100, g, torch.device("cpu"), scale=(0.99, 1.0), ratio=(1.0, 1.0))
    assert boxes.tolist() == [[0, 45, 10, 10]] * 8  # torchvision's fallback: height-limited centered square


def test_pipeline_shapes_reproducibility_and_per_sample_parameters(photos):
    images = (photos * 255).round().to(torch.uint8).repeat(4, 1, 1, 1)  # 32 samples
    aug = A.SimCLRAugment(strength=1.0, blur_prob=0.5, solarize_prob=0.2)
    out1 = aug(images, torch.Generator().manual_seed(3))
    out2 = aug(images, torch.Generator().manual_seed(3))
    out3 = aug(images, torch.Generator().manual_seed(4))
    assert out1.shape == images.shape and out1.dtype == torch.float32
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    assert not torch.allclose(out1[0], out1[8])  # the same photo, different parameters
    crops = A.random_resized_crop_flip(images, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (32, 3, 32, 32) and crops.dtype == torch.uint8
    assert not torch.equal(crops, A.random_resized_crop_flip(images, 32, torch.Generator().manual_seed(1)))


def test_probabilities_and_random_order():
    aug = A.SimCLRAugment(strength=1.0, jitter_prob=0.8, grayscale_prob=0.2)
    g = torch.Generator().manual_seed(0)
    factors, order = aug.jitter_params(4000, g, torch.device("cpu"))
    identity = (factors == torch.tensor([1.0, 1.0, 1.0, 0.0])).all(dim=1).float().mean().item()
    assert abs(identity - 0.2) < 0.03
    assert factors[:, :3].min() >= 0.2 - 1e-6 and factors[:, :3].max() <= 1.8 + 1e-6
    assert factors[:, 3].abs().max() <= 0.2 + 1e-6
    assert len({tuple(o) for o in order.tolist()}) == 24  # all orders of the four ops occur
    images = torch.full((4000, 3, 4, 4), 0.5)
    images[:, 0] = 0.9  # colored: grayscale is visible as equal channels
    out = aug(images, torch.Generator().manual_seed(1)) * aug.std + aug.mean
    gray = (out.amax(dim=1) - out.amin(dim=1)).amax(dim=(1, 2)) < 1e-5
    assert abs(gray.float().mean().item() - 0.2) < 0.04


def test_jitter_order_is_applied_per_sample():
    """A sample that drew brightness-then-contrast differs from contrast-then-brightness, and each equals
    torchvision's ops applied in that sample's order."""
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.4
    aug = A.SimCLRAugment()
    factors = torch.tensor([[1.6, 0.3, 1.0, 0.1], [1.6, 0.3, 1.0, 0.1]])
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    out = aug.color_jitter(x, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(2):
        ref = x[i]
        for k in order[i].tolist():
            ref = ops[k](ref, float(factors[i, k]))
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=0)
    assert not torch.allclose(out[0], out[1])
