"""Batched device augmentations against torchvision's ops applied per sample with the same parameters, on photographs.

Tolerances (float images in [0, 1]):
- brightness, contrast, saturation, grayscale, solarize: the same float formulas as torchvision: 1e-6 (a few ulps;
  the mean reduction may sum in another order), solarize and grayscale exactly.
- hue: 1e-5. The HSV shift is computed in closed form (max - chroma * trapezoid(6h + n)) where torchvision goes
  through h, s, v and a sector table: the same function, another rounding path (measured ~1.5e-6).
- blur: 1e-5. Separable 1-D passes where torchvision convolves once with the outer-product 2-D kernel.
- jitter chains and the whole pipeline: 1e-5 before, 5e-5 after normalization (/std ~ 0.22).
The random-resized crop + flip is tested in test_crop.py.
"""
import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from data import augment as A
from tests.data.photos import photo_crops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """24 crops of 48 px, float in [0, 1], with achromatic pixels and tied channels where ties matter (hue)."""
    x = photo_crops(24, 48).float() / 255
    x[0, :, :8] = 0.5
    x[1, 1] = x[1, 0]
    x[2, 2] = x[2, 1]
    return x


def per_sample(op, images, factors):
    return torch.stack([op(img, float(f)) for img, f in zip(images, factors)])


def factors_for(n: int, low: float, high: float, seed: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- single ops
@pytest.mark.parametrize("mine,reference", [(A.adjust_brightness, TF.adjust_brightness),
                                            (A.adjust_contrast, TF.adjust_contrast),
                                            (A.adjust_saturation, TF.adjust_saturation)])
def test_blend_ops_match_torchvision(photos, mine, reference):
    f = factors_for(len(photos), 0.2, 1.8)
    f[:2] = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(mine(photos, f), per_sample(reference, photos, f), atol=1e-6, rtol=0)


def test_hue_matches_torchvision_including_gray_and_tied_pixels(photos):
    hue = factors_for(len(photos), -0.5, 0.5)
    hue[:4] = torch.tensor([-0.5, 0.0, 0.5, 0.1])
    torch.testing.assert_close(A.adjust_hue(photos, hue), per_sample(TF.adjust_hue, photos, hue), atol=1e-5, rtol=0)


def test_grayscale_and_solarize_match_torchvision_exactly(photos):
    assert torch.equal(A.grayscale(photos), TF.rgb_to_grayscale(photos, num_output_channels=3))
    assert torch.equal(A.solarize(photos), TF.solarize(photos, 0.5))


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_blur_matches_torchvision(photos, kernel_size):
    sigma = factors_for(len(photos), 0.1, 2.0)
    ref = torch.stack([TF.gaussian_blur(img, [kernel_size] * 2, [float(s)] * 2) for img, s in zip(photos, sigma)])
    torch.testing.assert_close(A.gaussian_blur(photos, sigma, kernel_size), ref, atol=1e-5, rtol=0)
    assert A.blur_kernel_size(96) == 9 and A.blur_kernel_size(224) == 23 and A.blur_kernel_size(32) == 3


def test_color_jitter_applies_each_samples_order(photos):
    """All 24 orders, each sample against torchvision's four functional ops applied in its order."""
    n = len(photos)
    order = torch.tensor(list(itertools.permutations(range(4))))  # the 24 orders
    factors = torch.stack([factors_for(n, 0.2, 1.8, 2), factors_for(n, 0.2, 1.8, 3),
                           factors_for(n, 0.2, 1.8, 4), factors_for(n, -0.2, 0.2, 5)], dim=1)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = []
    for img, f, o in zip(photos, factors, order):
        for k in o.tolist():
            img = ops[k](img, float(f[k]))
        ref.append(img)
    out = A.color_jitter(photos, factors, order)
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=0)
    swapped = A.color_jitter(photos, factors, order.flip(1))
    assert ((out - swapped).abs().amax(dim=(1, 2, 3)) > 1e-3).sum() >= 20  # the order matters (nearly always)


# ----------------------------------------------------------------------------- the pipeline
def reference_pipeline(images: torch.Tensor, p: A.AugmentParams, kernel_size: int) -> torch.Tensor:
    """torchvision's functional ops, one sample at a time, with the parameters SimCLRAugment drew."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i, img in enumerate(images.float() / 255):
        if p.jitter[i]:
            for k in p.order[i].tolist():
                img = ops[k](img, float(p.factors[i, k]))
        if p.grayscale[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.blur[i]:
            img = TF.gaussian_blur(img, [kernel_size] * 2, [float(p.sigma[i])] * 2)
        if p.solarize[i]:
            img = TF.solarize(img, 0.5)
        out.append(TF.normalize(img, A.IMAGENET_MEAN, A.IMAGENET_STD))
    return torch.stack(out)


def test_pipeline_matches_torchvision_per_sample():
    images = photo_crops(48, 40, seed=5)
    aug = A.SimCLRAugment(strength=1.0, blur_prob=0.5, solarize_prob=0.3)
    params = aug.sample(len(images), torch.Generator().manual_seed(0), images.device)
    assert params.jitter.any() and params.grayscale.any() and params.blur.any() and params.solarize.any()
    ref = reference_pipeline(images, params, A.blur_kernel_size(40))
    torch.testing.assert_close(aug.apply(images, params), ref, atol=5e-5, rtol=0)
    torch.testing.assert_close(aug(images, torch.Generator().manual_seed(0)), ref, atol=5e-5, rtol=0)


def test_output_contract_reproducibility_and_chunking(monkeypatch):
    images = photo_crops(40, 32, seed=6)
    aug = A.SimCLRAugment(blur_prob=0.5, solarize_prob=0.2)
    out = aug(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
    assert torch.equal(out, aug(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, aug(images, torch.Generator().manual_seed(4)))
    torch.testing.assert_close(aug(images.float() / 255, torch.Generator().manual_seed(3)), out, atol=1e-6, rtol=0)
    monkeypatch.setattr(A, "CPU_CHUNK_BYTES", 1)  # one sample per chunk: the same per-sample results
    torch.testing.assert_close(aug(images, torch.Generator().manual_seed(3)), out, atol=1e-6, rtol=0)


def test_each_sample_gets_its_own_parameters():
    candidates = photo_crops(16, 32, seed=7)
    textured = candidates[candidates.float().std(dim=(1, 2, 3)).argmax()]
    images = textured.expand(64, -1, -1, -1)
    aug = A.SimCLRAugment(jitter_prob=1.0, grayscale_prob=0.0)
    out = aug(images, torch.Generator().manual_seed(0)).flatten(1)
    gaps = (out[:, None] - out[None]).abs().amax(dim=2) + torch.eye(64)
    assert gaps.min() > 0.05  # no two views of the same photo alike
    p = aug.sample(64, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(len(col.unique()) == 64 for col in p.factors.T)


def test_parameter_ranges_and_probabilities():
    n, s = 4000, 0.5
    aug = A.SimCLRAugment(strength=s, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.1)
    p = aug.sample(n, torch.Generator().manual_seed(0), torch.device("cpu"))
    bsc, hue = p.factors[:, :3], p.factors[:, 3]
    assert bsc.min() >= 1 - 0.8 * s and bsc.max() <= 1 + 0.8 * s and bsc.min() < 0.62 and bsc.max() > 1.38
    assert hue.abs().max() <= 0.2 * s and hue.min() < -0.09 and hue.max() > 0.09
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    assert len({tuple(o) for o in p.order.tolist()}) == 24  # all orders of the four ops occur
    for flag, prob in [(p.jitter, 0.8), (p.grayscale, 0.2), (p.blur, 0.5), (p.solarize, 0.1)]:
        assert abs(flag.float().mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n)


def test_grayscale_rate_seen_in_the_output():
    images = photo_crops(2000, 8, seed=8)
    aug = A.SimCLRAugment(jitter_prob=0.0, grayscale_prob=0.2)
    out = aug(images, torch.Generator().manual_seed(1)) * aug.std + aug.mean
    gray = (out.amax(dim=1) - out.amin(dim=1)).amax(dim=(1, 2)) < 1e-5
    assert abs(gray.float().mean() - 0.2) < 4 * math.sqrt(0.16 / 2000)


def test_normalize_is_the_pipelines_last_step_alone():
    """Evaluation images are normalized as pretraining views are: torchvision's normalize with the same statistics,
    and what SimCLRAugment returns when no color op fires."""
    images = photo_crops(8, 16, seed=10)
    expected = TF.normalize(images.float() / 255, A.IMAGENET_MEAN, A.IMAGENET_STD)
    torch.testing.assert_close(A.normalize(images), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(A.normalize(images.float() / 255), expected, atol=1e-6, rtol=0)  # [0, 1] floats
    no_color = A.SimCLRAugment(jitter_prob=0.0, grayscale_prob=0.0)
    torch.testing.assert_close(no_color(images, torch.Generator().manual_seed(0)), A.normalize(images), atol=1e-6,
                               rtol=0)


def test_strength_must_keep_hue_within_half_a_turn():
    with pytest.raises(ValueError, match="strength"):
        A.SimCLRAugment(strength=3.0)


# ----------------------------------------------------------------------------- CUDA (skipped without a device)
@CUDA
def test_cuda_matches_cpu_with_a_cpu_generator_and_never_syncs():
    images = photo_crops(64, 48, seed=9)
    aug = A.SimCLRAugment(blur_prob=0.5, solarize_prob=0.2)
    cpu = aug(images, torch.Generator().manual_seed(0))
    gpu_images = images.cuda()
    aug(gpu_images, torch.Generator().manual_seed(0))  # warm-up: the per-device mean/std copy happens once
    torch.cuda.synchronize()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 blur
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = aug(gpu_images, torch.Generator().manual_seed(0))
        on_device = aug(gpu_images, torch.Generator(device="cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    assert gpu.device.type == "cuda" and on_device.device.type == "cuda" and on_device.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
