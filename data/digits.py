"""The embedded default data set: scikit-learn's bundled handwritten digits as RGB uint8 images, and a synthetic set."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits_uint8(image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: (images uint8 [N, 3, S, S], labels int64 [N]); 8x8 originals upsampled to S (bilinear)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    if image_size is not None and image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=True)
    images = images.clamp_(0, 1).mul_(255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(bunch.target).long()


def synthetic_images(count: int, image_size: int, num_classes: int = 10, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reproducible structured images for tests and benchmarks: class-dependent color gradients plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (count,), generator=g)
    ys = torch.linspace(0, 1, image_size).view(1, 1, -1, 1)
    xs = torch.linspace(0, 1, image_size).view(1, 1, 1, -1)
    phase = (labels.float() / num_classes).view(-1, 1, 1, 1)
    channel = torch.arange(3).float().view(1, 3, 1, 1)
    base = 0.5 + 0.5 * torch.sin(6.28 * (xs * (1 + channel) + ys * phase * 3 + phase))
    noise = torch.rand(count, 3, image_size, image_size, generator=g) * 0.2
    images = (base * 0.8 + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images, labels
