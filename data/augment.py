"""SimCLR augmentations batched on the images' device, each sample with its own random parameters.

Brightness, contrast, saturation and grayscale are linear maps of a pixel's RGB vector: each is a per-sample
3x3 matrix (plus, for contrast, a per-sample offset). Hue is an exact HSV shift, as torchvision's and SimCLR's
(a YIQ rotation would be one more matrix, but differs from HSV by 0.08 mean absolute at hue 0.1 on real
photographs). The four jitter ops in a random order per sample cost four positions of (one matrix pass, one
hue pass): at position k every sample applies the op it drew for position k, the others an identity.
Blur is a separable Gaussian with per-sample sigma as a grouped convolution. No host syncs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


# ----------------------------------------------------------------------------- randomness
def _uniform(shape, low, high, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, device=gen_device).to(device)
    return low + (high - low) * u


def _bernoulli(shape, p: float, generator, device) -> torch.Tensor:
    return _uniform(shape, 0.0, 1.0, generator, device) < p


# ----------------------------------------------------------------------------- per-sample color matrices
def _eye(batch: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(batch, 3, 3)


def brightness_matrix(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1) * _eye(len(factor), factor.device)


def saturation_matrix(factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * gray(x), as torchvision's adjust_saturation (before clamping)."""
    gray = torch.tensor(LUMA, device=factor.device).view(1, 1, 3).expand(len(factor), 3, 3)
    f = factor.view(-1, 1, 1)
    return f * _eye(len(factor), factor.device) + (1 - f) * gray


def grayscale_matrix(batch: int, device) -> torch.Tensor:
    return torch.tensor(LUMA, device=device).view(1, 1, 3).expand(batch, 3, 3)


def apply_color(images: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1]; out[b] = clamp(matrix[b] @ pixel + offset[b])."""
    out = torch.einsum("bij,bjhw->bihw", matrix.to(images.dtype), images)
    if offset is not None:
        out = out + offset.view(-1, 1, 1, 1).to(images.dtype)
    return out.clamp_(0.0, 1.0)


def gray_mean(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean of the grayscale image (torchvision's contrast reference), [B]."""
    luma = torch.tensor(LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * luma).sum(dim=1).mean(dim=(1, 2))


def adjust_brightness(images, factor):
    return apply_color(images, brightness_matrix(factor))


def adjust_contrast(images, factor):
    return apply_color(images, brightness_matrix(factor), (1 - factor) * gray_mean(images))


def adjust_saturation(images, factor):
    return apply_color(images, saturation_matrix(factor))


def adjust_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift in HSV space (hue in [-0.5, 0.5] of a full turn), as torchvision's adjust_hue.

    Value (max) and chroma (max - min) are unchanged by a hue shift, so only the hue angle is computed:
    6h = 2 * (index of the max channel) + (next channel - the one after) / chroma, and back to RGB with
    channel n (R=5, G=3, B=1) = max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    """
    r, g, b = images.unbind(dim=1)
    maxc = images.amax(dim=1)
    chroma = maxc - images.amin(dim=1)
    is_r = r == maxc  # ties go to R, then G, as torchvision
    is_g = (g == maxc) & ~is_r
    following = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    base = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    sixth = following.div_(torch.where(chroma > 0, chroma, 1.0)).add_(base)
    sixth = sixth.add_(6.0 * hue.view(-1, 1, 1).to(images.dtype)).unsqueeze(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + sixth, 6.0)  # min(k, 4 - k) = 2 - |k - 2|
    weight = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * weight


def to_grayscale(images):
    return apply_color(images, grayscale_matrix(len(images), images.device))


# ----------------------------------------------------------------------------- blur, solarize
def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[B, k] normalized 1-D Gaussian kernels, as torchvision's _get_gaussian_kernel1d."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigma.device)
    k = torch.exp(-0.5 * (x.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur with per-sample sigma (grouped convolution), reflect padding as torchvision."""
    b, c, h, w = images.shape
    kernels = gaussian_kernels(sigma, kernel_size).to(images.dtype).repeat_interleave(c, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels.view(b * c, 1, 1, kernel_size), groups=b * c)
    x = F.conv2d(x, kernels.view(b * c, 1, kernel_size, 1), groups=b * c)
    return x.view(b, c, h, w)


def solarize(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(images >= threshold, 1.0 - images, images)


# ----------------------------------------------------------------------------- the pipeline
class SimCLRAugment:
    """uint8 (or [0, 1] float) [B, 3, H, W] -> float32 normalized, SimCLR's color pipeline per sample.

    Color jitter (brightness, contrast, saturation 0.8*s, hue 0.2*s; random order per sample) with prob
    jitter_prob, grayscale with grayscale_prob, Gaussian blur (kernel ~10% of the side, sigma in [0.1, 2])
    with blur_prob, solarization with solarize_prob, then normalization. Random numbers come from
    `generator` (on any device; they are moved to the images' device), so a seed reproduces the output.
    """

    def __init__(self, strength: float = 1.0, jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 blur_prob: float = 0.0, solarize_prob: float = 0.0, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225)):
        self.strength, self.jitter_prob, self.grayscale_prob = strength, jitter_prob, grayscale_prob
        self.blur_prob, self.solarize_prob = blur_prob, solarize_prob
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def jitter_params(self, batch: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(factors [B, 4]: brightness, contrast, saturation, hue; order [B, 4]: op index per position);
        samples that skip jitter get identity factors."""
        s = self.strength
        spans = torch.tensor([0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s], device=device)
        low = torch.cat([(1 - spans[:3]).clamp_min(0), -spans[3:]])
        high = torch.cat([1 + spans[:3], spans[3:]])
        factors = low + (high - low) * _uniform((batch, 4), 0.0, 1.0, generator, device)
        keep = _bernoulli((batch, 1), self.jitter_prob, generator, device)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
        order = _uniform((batch, 4), 0.0, 1.0, generator, device).argsort(dim=1)
        return torch.where(keep, factors, identity), order

    def color_jitter(self, images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """At each of the 4 positions: every sample applies the op it drew there (identity for the others)."""
        batch = len(images)
        matrices = torch.stack([brightness_matrix(factors[:, 0]), brightness_matrix(factors[:, 1]),
                                saturation_matrix(factors[:, 2]), _eye(batch, images.device)], dim=1)  # [B, 4, 3, 3]
        rows = torch.arange(batch, device=images.device)
        zeros = torch.zeros_like(factors[:, 0])
        for position in range(4):
            op = order[:, position]
            offset = torch.where(op == 1, (1 - factors[:, 1]) * gray_mean(images), zeros)
            images = apply_color(images, matrices[rows, op], offset)
            images = adjust_hue(images, torch.where(op == 3, factors[:, 3], zeros))
        return images

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        device = images.device
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        batch, _, height, _ = x.shape
        x = self.color_jitter(x, *self.jitter_params(batch, generator, device))
        gray = _bernoulli((batch,), self.grayscale_prob, generator, device).view(-1, 1, 1)
        x = apply_color(x, torch.where(gray, grayscale_matrix(batch, device), _eye(batch, device)))
        if self.blur_prob > 0:
            kernel_size = max(3, int(0.1 * height) // 2 * 2 + 1)
            sigma = _uniform((batch,), 0.1, 2.0, generator, device)
            blur = _bernoulli((batch,), self.blur_prob, generator, device)
            sigma = torch.where(blur, sigma, torch.full_like(sigma, 1e-3))  # ~ a delta kernel: no blur
            x = gaussian_blur(x, sigma, kernel_size)
        if self.solarize_prob > 0:
            flip = _bernoulli((batch, 1, 1, 1), self.solarize_prob, generator, device)
            x = torch.where(flip, solarize(x), x)
        return (x - self.mean.to(device)) / self.std.to(device)


# ----------------------------------------------------------------------------- geometry
def crop_boxes(batch: int, height: int, width: int, generator, device, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               tries: int = 10) -> torch.Tensor:
    """[B, 4] boxes (top, left, h, w) drawn like torchvision's RandomResizedCrop.get_params, vectorized over
    the batch and the 10 tries; samples with no valid try get torchvision's center-crop fallback."""
    area = height * width
    target = area * _uniform((batch, tries), scale[0], scale[1], generator, device)
    log_r = _uniform((batch, tries), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.float().argmax(dim=1, keepdim=True)  # first valid try (0 when none: masked below)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = torch.floor(_uniform((batch,), 0.0, 1.0, generator, device) * (height - h + 1))
    left = torch.floor(_uniform((batch,), 0.0, 1.0, generator, device) * (width - w + 1))
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], device=device, dtype=h.dtype)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(valid.any(dim=1, keepdim=True), boxes, fallback)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of each sample's box to size x size (area-averaged when shrinking), float out."""
    from torchvision.ops import roi_align

    b = len(images)
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    rois = torch.stack([torch.arange(b, device=images.device, dtype=torch.float32), left, top, left + w, top + h], 1)
    return roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_resized_crop_flip(images: torch.Tensor, size: int, generator: torch.Generator | None = None,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5) -> torch.Tensor:
    """uint8 [B, C, H, W] -> uint8 [B, C, size, size]: a random-resized crop per sample, then a horizontal flip
    with probability flip_prob."""
    b, _, height, width = images.shape
    boxes = crop_boxes(b, height, width, generator, images.device, scale, ratio)
    out = resized_crops(images, boxes, size)
    flip = _bernoulli((b, 1, 1, 1), flip_prob, generator, images.device)
    out = torch.where(flip, out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)
