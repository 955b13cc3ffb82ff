"""SimCLR's colour augmentations and the normalization, batched on the images' device, each sample with its own
random parameters (the random-resized crop + flip is data/crop.py).

Every op is one vectorized pass over the batch with per-sample parameter tensors (no Python loop over samples)
and reproduces torchvision's float kernel for the same parameters (tests/data/test_augment.py states the
tolerances). No host syncs: no `.item()`, no Python branch on tensor values, host-to-device copies from pinned
memory without blocking.

Randomness: every draw comes from `generator`, on the generator's own device (a CPU generator with CUDA images,
or a generator on the images' device; None: the default generator of the images' device). The draws are then
moved to the images' device. The same generator state gives the same output.

Color jitter in a random order per sample without computing hue four times: a sample's order is (blends before
hue, hue, blends after hue), where the blends (brightness, contrast, saturation) are cheap. So three blend
positions run before one hue pass and three after; at each position a sample applies the op of its order
there, or an exact identity.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, the constants of torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # op ids as torchvision ColorJitter's fn_idx
CPU_CHUNK_BYTES = 2 << 20  # float32 pixels per chunk on the CPU
# ImageNet's channel statistics: every model input is normalized with them (SimCLRAugment's views, normalize's images)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- randomness
def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Moves a small tensor; CPU -> CUDA through pinned memory without blocking the host (other directions block,
    as they must before the host reads the values)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 U[0, 1) drawn on the generator's device (`device` when None), returned on `device`."""
    source = generator.device if generator is not None else device
    return to_device(torch.rand(shape, generator=generator, device=source), device)


# ----------------------------------------------------------------------------- color ops, per-sample factors
def _per_sample(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return to_device(torch.as_tensor(factor), x.device).to(x.dtype).view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] grayscale, the same float ops as torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample a where mask [B] else b, exactly (lerp with weight 0 or 1; much faster than torch.where on CPU)."""
    return torch.lerp(b, a, mask.view(-1, *[1] * (a.dim() - 1)).to(a.dtype))


def blend(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(f * x + (1 - f) * other) per sample, other = 0 (op BRIGHTNESS), the mean of the grayscale image
    (CONTRAST) or the grayscale image (SATURATION), as torchvision's _blend; any other op id: identity."""
    op = to_device(op, x.device).view(-1, 1, 1, 1)
    f = torch.where((op >= BRIGHTNESS) & (op <= SATURATION), _per_sample(factor, x), 1.0)
    gray = luma(x)
    mean_weight = (op == CONTRAST) * (1.0 - f) * gray.mean(dim=(2, 3), keepdim=True)  # [B, 1, 1, 1]
    other = torch.addcmul(mean_weight, gray, (op == SATURATION) * (1.0 - f))  # (1 - f) * other, exactly
    return torch.addcmul(other, x, f).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, torch.full_like(torch.as_tensor(factor), BRIGHTNESS, dtype=torch.long), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, torch.full_like(torch.as_tensor(factor), CONTRAST, dtype=torch.long), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, torch.full_like(torch.as_tensor(factor), SATURATION, dtype=torch.long), factor)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-sample HSV hue shift (hue in [-0.5, 0.5] of a turn), as torchvision's adjust_hue.

    A hue shift keeps value (max) and chroma (max - min), so only the angle is computed: 6h = 2 * (index of the
    max channel) + (next channel - the one after) / chroma, and back with channel n (R=5, G=3, B=1) =
    max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6 (the closed form of HSV -> RGB).
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = (r == maxc).to(x.dtype)  # ties go to R, then G, as torchvision
    is_g = (g == maxc).to(x.dtype).mul_(1.0 - is_r)
    following = torch.lerp(torch.lerp(r - g, b - r, is_g), g - b, is_r)  # exact selects
    base = is_r.mul_(-4.0).sub_(is_g, alpha=2.0).add_(4.0).add_(_per_sample(hue, x).view(-1, 1, 1), alpha=6.0)
    sixth = following.div_(chroma.clamp(min=torch.finfo(x.dtype).tiny)).add_(base)  # chroma 0: following is 0
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = sixth + n
        k = k.sub_(torch.floor(k * (1.0 / 6.0)), alpha=6.0)  # k mod 6 (the weight is continuous across 0 ~ 6)
        weight = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)  # min(k, 4 - k) = 2 - |k - 2|
        torch.addcmul(maxc, chroma, weight, value=-1.0, out=out[:, channel])
    return out


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [B, 3, H, W] in [0, 1]; factors [B, 4] (brightness, contrast, saturation, hue); order [B, 4], a
    permutation of the op ids per sample. Equals applying each sample's four ops in its order."""
    order = to_device(order, x.device)
    factors = to_device(factors, x.device).to(x.dtype)
    hue_at = (order == HUE).int().argmax(dim=1, keepdim=True)  # [B, 1]
    positions = torch.arange(4, device=x.device)
    before = torch.where(positions < hue_at, order, -1)  # blends before the hue shift, -1: identity
    after = torch.where(positions > hue_at, order, -1)
    for ops in [before[:, p] for p in range(3)]:
        x = blend(x, ops, factors.gather(1, ops.clamp(0, 2).view(-1, 1)))
    x = adjust_hue(x, factors[:, HUE])
    for ops in [after[:, p] for p in range(1, 4)]:
        x = blend(x, ops, factors.gather(1, ops.clamp(0, 2).view(-1, 1)))
    return x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """3-channel grayscale, as torchvision's rgb_to_grayscale(num_output_channels=3)."""
    return luma(x).expand_as(x)


def blur_kernel_size(side: int) -> int:
    """About 10% of the side, odd (SimCLR's choice: 9 at 96 px, 23 at 224 px)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma (grouped convolutions), reflect padding, as torchvision."""
    b, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype).view(1, -1)
    k = torch.exp(-0.5 * (t / _per_sample(sigma, x).view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B * C, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.view(b, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) [B, 3, H, W] -> float32 (x - IMAGENET_MEAN) / IMAGENET_STD: the step SimCLRAugment
    ends with, alone (evaluation and fine-tuning see unaugmented images normalized as pretraining saw its views)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- the color pipeline
@dataclass
class AugmentParams:
    """Per-sample parameters of one SimCLRAugment call, all [B] or [B, 4] on the images' device."""
    jitter: torch.Tensor  # bool: color jitter applied
    factors: torch.Tensor  # brightness, contrast, saturation, hue
    order: torch.Tensor  # the jitter ops' order, a permutation of BRIGHTNESS..HUE
    grayscale: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # the blur's sigma
    solarize: torch.Tensor  # bool


class SimCLRAugment:
    """uint8 (or [0, 1] float) [B, 3, H, W] -> float32 normalized [B, 3, H, W] on the same device.

    Color jitter (brightness, contrast, saturation 0.8*s, hue 0.2*s; the four ops in a random order per sample)
    with prob jitter_prob, grayscale with grayscale_prob, Gaussian blur (kernel ~10% of the side, sigma in
    [0.1, 2]) with blur_prob, solarization (threshold 0.5) with solarize_prob, then normalize's
    (x - IMAGENET_MEAN) / IMAGENET_STD.
    """

    def __init__(self, strength: float = 1.0, jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 blur_prob: float = 0.0, solarize_prob: float = 0.0):
        if not 0.0 <= strength <= 2.5:
            raise ValueError(f"strength={strength}: must be in [0, 2.5] (hue 0.2 * strength is at most half a turn)")
        self.strength, self.jitter_prob, self.grayscale_prob = strength, jitter_prob, grayscale_prob
        self.blur_prob, self.solarize_prob = blur_prob, solarize_prob
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def sample(self, batch: int, generator: torch.Generator | None, device: torch.device) -> AugmentParams:
        """Draws every sample's parameters from the ranges of torchvision's transforms, in a fixed order (factors,
        jitter, order, grayscale, then sigma and blur only when blur_prob > 0, solarize only when > 0)."""
        def draw(*shape):
            return uniform(shape, generator, device)

        low, high, hue = max(0.0, 1 - 0.8 * self.strength), 1 + 0.8 * self.strength, 0.2 * self.strength
        u = draw(batch, 4)
        factors = torch.cat([low + (high - low) * u[:, :3], hue * (2 * u[:, 3:] - 1)], dim=1)
        jitter, order, gray = draw(batch) < self.jitter_prob, draw(batch, 4).argsort(dim=1), draw(batch)
        sigma, blur = (draw(batch), draw(batch)) if self.blur_prob > 0 else (torch.ones(batch, device=device),) * 2
        solarize = draw(batch) if self.solarize_prob > 0 else torch.ones(batch, device=device)
        return AugmentParams(jitter=jitter, factors=factors, order=order, grayscale=gray < self.grayscale_prob,
                             blur=blur < self.blur_prob, sigma=0.1 + 1.9 * sigma,
                             solarize=solarize < self.solarize_prob)

    def apply(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """The pipeline with given parameters. On the CPU it runs in chunks of a few MiB of pixels, which stay in
        cache across the ~40 elementwise passes (~3x faster than whole-batch passes on an idle CPU; on a CPU
        oversubscribed by other processes the many small multi-threaded ops stall at thread barriers: use one
        torch thread there, as torchrun does with several ranks per node). Elsewhere in one piece."""
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        step = len(images) if images.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // (4 * images[0].numel()))
        for i in range(0, len(images), step):
            rows = slice(i, i + step)
            out[rows] = self._apply(images[rows], AugmentParams(*(getattr(p, f.name)[rows] for f in fields(p))))
        return out

    def _apply(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        x = select(p.jitter, color_jitter(x, p.factors, p.order), x)
        x = blend(x, torch.where(p.grayscale, SATURATION, -1), torch.zeros_like(p.sigma))  # saturation 0: gray
        if self.blur_prob > 0:  # a Python float: no sync
            x = select(p.blur, gaussian_blur(x, p.sigma, blur_kernel_size(min(x.shape[-2:]))), x)
        if self.solarize_prob > 0:
            x = select(p.solarize, solarize(x), x)
        mean, std = self._normalization(x.device)
        return x.sub_(mean).div_(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), generator, images.device))

    def _normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:  # a blocking copy, once per device (not per call)
            self._stats[device] = (self.mean.to(device), self.std.to(device))
        return self._stats[device]
