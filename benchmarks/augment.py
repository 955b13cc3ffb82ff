"""Device augmentation throughput in views/s: data.augment and data.crop against kornia and a torchvision
per-sample loop.

    python -m benchmarks.augment [--device cpu|cuda|cuda:N] [--size 96] [--batch 256] [--seconds 20] [--threads N]
                                 [--out FILE]

Every case takes the same uint8 [batch, 3, size, size] batch of photograph crops on the device and returns float
normalized views, with SimCLR's color recipe (ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2):
(a) data.augment.SimCLRAugment; (b) kornia's ColorJitter + RandomGrayscale (per-sample parameters; skipped with a
note when kornia is not installed: `pip install kornia`); (c) torchvision.transforms.v2 applied one sample at a
time. Also SimCLRAugment with blur p=0.5 and solarize p=0.2, and the crop: data.crop.random_resized_crop_flip
against torchvision's RandomResizedCrop + RandomHorizontalFlip per sample. Cases run in alternating rounds.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

from benchmarks.common import add_device_argument, emit, environment, resolve_device, sync
from data.augment import IMAGENET_MEAN, IMAGENET_STD, SimCLRAugment, normalize
from data.crop import random_resized_crop_flip


def photo_batch(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """uint8 [batch, 3, size, size]: random crops of scikit-learn's sample photographs, resized to `size`."""
    import torchvision.transforms.v2.functional as TF
    from sklearn.datasets import load_sample_image

    photos = [torch.from_numpy(load_sample_image(n).copy()).permute(2, 0, 1) for n in ("china.jpg", "flower.jpg")]
    g = torch.Generator().manual_seed(0)
    crops = []
    for i in range(batch):
        side = int(torch.randint(size, 400, (1,), generator=g))
        top, left = (int(torch.randint(0, limit - side + 1, (1,), generator=g)) for limit in (427, 640))
        crops.append(TF.resize(photos[i % 2][:, top:top + side, left:left + side], [size, size], antialias=True))
    return torch.stack(crops).to(device)


def _kornia_case(images: torch.Tensor) -> tuple[Callable[[], object] | None, str | None]:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None, "kornia not importable: pip install kornia for this comparison"
    kornia_normalize = K.Normalize(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    pipeline = torch.nn.Sequential(K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), K.RandomGrayscale(p=0.2),
                                   kornia_normalize).to(images.device)
    return lambda: pipeline(images.float() / 255), None


def _torchvision_cases(images: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:
    from torchvision.transforms import v2

    color = v2.Compose([v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(p=0.2)])
    size = images.shape[-1]
    crop = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])

    def colors():
        return normalize(torch.stack([color(img) for img in images.float() / 255]))

    def crops():
        return torch.stack([crop(img) for img in images])

    return colors, crops


def _interleaved(cases: dict[str, Callable[[], object]], device: torch.device, seconds: float,
                 rounds: int = 5) -> dict[str, float]:
    """Seconds per call of each case, the median of `rounds` alternating rounds sharing `seconds` of run time."""
    for fn in cases.values():
        fn()  # warm-up (allocations, kernel selection)
    sync(device)
    slot = seconds / (rounds * len(cases))
    per_call: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < slot:
                fn()
                calls += 1
                sync(device)
            per_call[name].append((time.perf_counter() - start) / calls)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in per_call.items()}


def measure_views_per_s(device, size: int = 96, batch: int = 256, seconds: float = 20.0) -> dict:
    """views/s of each case (see the module docstring) and the ratios of data.augment to the baselines."""
    device = resolve_device(device)
    images = photo_batch(batch, size, device)
    ours, ours_full = SimCLRAugment(), SimCLRAugment(blur_prob=0.5, solarize_prob=0.2)
    g = torch.Generator(device=device).manual_seed(0)
    tv_colors, tv_crops = _torchvision_cases(images)
    cases = {"simclr_augment": lambda: ours(images, g), "torchvision_v2_per_sample_loop": tv_colors,
             "simclr_augment_blur_solarize": lambda: ours_full(images, g),
             "random_resized_crop_flip": lambda: random_resized_crop_flip(images, size, g),
             "torchvision_v2_crop_flip_per_sample_loop": tv_crops}
    kornia, note = _kornia_case(images)
    if kornia is not None:
        cases["kornia_colorjitter_grayscale"] = kornia
    seconds_per_call = _interleaved(cases, device, seconds)
    views = {f"{name}_views_per_s": batch / s for name, s in seconds_per_call.items()}
    out = {"device": str(device), "size": size, "batch": batch, "seconds": seconds, **views,
           "ratio_simclr_augment_over_torchvision_loop":
               views["simclr_augment_views_per_s"] / views["torchvision_v2_per_sample_loop_views_per_s"],
           "ratio_crop_flip_over_torchvision_loop": views["random_resized_crop_flip_views_per_s"]
               / views["torchvision_v2_crop_flip_per_sample_loop_views_per_s"]}
    if kornia is not None:
        out["ratio_simclr_augment_over_kornia"] = (views["simclr_augment_views_per_s"]
                                                   / views["kornia_colorjitter_grayscale_views_per_s"])
    else:
        out["kornia_note"] = note
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--size", type=int, default=96, help="image side in px (96: STL10)")
    parser.add_argument("--batch", type=int, default=256, help="views per call")
    parser.add_argument("--seconds", type=float, default=20.0, help="total timed run, shared by all cases")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"benchmark": "augment", "environment": environment(), "load_average_1m": os.getloadavg()[0],
              "config": vars(args), "results": measure_views_per_s(args.device, args.size, args.batch, args.seconds)}
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
