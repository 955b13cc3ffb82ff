"""The random-resized crop + horizontal flip of a batch, each sample with its own box: torchvision's
RandomResizedCrop box distribution and antialiased bilinear resize (tests/data/test_crop.py states the tolerances),
as two batched matmuls instead of a Python loop over samples.

The in-memory loader and fine-tuning crop with it (the FFCV and torchvision loaders crop in their workers, with
the same distribution). Randomness as in data.augment: every draw comes from `generator` on its own device and is
moved to the images' device, so the same generator state gives the same crops.
"""
from __future__ import annotations

import math

import torch

from data.augment import to_device, uniform

CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many boxes before its center-crop fallback


def crop_boxes(batch: int, height: int, width: int, generator: torch.Generator | None = None,
               device=torch.device("cpu"), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """[B, 4] int64 (top, left, h, w) as torchvision's RandomResizedCrop.get_params, vectorized over samples and
    tries: the first of 10 tries that fits, else its center-crop fallback. Draws: areas, aspect ratios (both
    [B, 10]), tops, lefts ([B])."""
    t = CROP_TRIES
    u = torch.cat([uniform((batch, t), generator, device), uniform((batch, t), generator, device),
                   uniform((batch, 1), generator, device), uniform((batch, 1), generator, device)], dim=1).double()
    target = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :t])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, t:2 * t])
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # 0 when none fits: replaced below
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = torch.floor(u[:, 2 * t] * (height - h + 1))  # float64: u < 1 keeps it below height - h + 1
    left = torch.floor(u[:, 2 * t + 1] * (width - w + 1))
    if width / height < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    any_fits = fits.any(dim=1)
    fallback = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return torch.stack([torch.where(any_fits, v, f) for v, f in zip((top, left, h, w), fallback)], dim=1).long()


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """[B, out_size, in_size]: the weights of torch's antialiased bilinear resize (F.interpolate(antialias=True):
    a triangle filter widened by the shrink factor; plain bilinear when enlarging) of each sample's window
    [start, start + length) of an axis, as a matrix. Outside the window the weight is 0 (crop, then resize)."""
    start, length = start.float().view(-1, 1, 1), length.float().view(-1, 1, 1)
    scale = length / out_size
    inv_support = torch.where(scale >= 1.0, 1.0 / scale, 1.0)
    center = scale * (torch.arange(out_size, device=start.device).view(1, -1, 1) + 0.5)
    j = torch.arange(in_size, device=start.device).view(1, 1, -1) - start  # index inside the window
    w = (1.0 - ((j + 0.5 - center) * inv_support).abs()).clamp_(min=0.0) * ((j >= 0) & (j < length))
    return w / w.sum(dim=2, keepdim=True)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[B, C, H, W] -> float [B, C, size, size]: each sample's box (top, left, h, w) resized as torchvision's
    resized_crop(antialias=True), then mirrored where `flip`: two batched matmuls, Rows @ image @ Cols^T."""
    b, c, height, width = images.shape
    top, left, h, w = to_device(boxes, images.device).unbind(dim=1)
    rows = resize_weights(top, h, height, size)  # [B, size, H]
    cols = resize_weights(left, w, width, size)  # [B, size, W]
    if flip is not None:
        cols = torch.where(to_device(flip, images.device).view(-1, 1, 1), cols.flip(1), cols)
    # rows first on an [B, H, C * W] layout, so both products are plain bmm (no broadcast copies)
    x = torch.empty(b, height, c, width, dtype=torch.float32, device=images.device)
    x = x.copy_(images.permute(0, 2, 1, 3)).view(b, height, c * width)
    y = torch.bmm(torch.bmm(rows, x).view(b, size * c, width), cols.transpose(1, 2))  # [B, size * C, size]
    return y.view(b, size, c, size).permute(0, 2, 1, 3).contiguous()


def random_resized_crop_flip(images: torch.Tensor, size: int, generator: torch.Generator | None = None,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5) -> torch.Tensor:
    """uint8 [B, C, H, W] -> uint8 [B, C, size, size] (float in -> float out): a random-resized crop per sample
    (torchvision's box distribution and antialiased bilinear resize), then a horizontal flip with flip_prob."""
    b, _, height, width = images.shape
    boxes = crop_boxes(b, height, width, generator, images.device, scale, ratio)
    out = resized_crop(images, boxes, size, uniform((b,), generator, images.device) < flip_prob)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out
