"""Loader throughput in samples/s delivered as two views, side by side in one run, from real photographs.

    python -m benchmarks.loader [--quick] [--device cpu|cuda|cuda:N] [--workers 2]

(a) the FFCV loader (decode once + two random-resized crops + flips: what stays on the CPU when a GPU is present),
    next to (a0) stock FFCV with two pipelines on the image field (decodes every image twice);
(b) the seed's way: the full augmentation in PIL DataLoader workers (crop, flip, ColorJitter p=0.8,
    grayscale p=0.2, ToTensor to float as the seed did, both views);
(c) JPEG decode alone (PIL, one decode per sample): the limit of any JPEG pipeline;
(d) data.augment.SimCLRAugment alone on --device (the device given, never silently the CPU), in views/s.
At 96 px (STL10-like) and 224 px, from ~400x350 JPEG crops of scikit-learn's sample photographs.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import add_device_argument, emit, environment, resolve_device, sync


def make_photos(folder: Path, count: int) -> Path:
    """`count` distinct ~400x350 JPEG crops of the two sample photographs, ImageFolder layout."""
    from sklearn.datasets import load_sample_image

    root = folder / "photos"
    (root / "a").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    for i in range(count):
        img = photos[i % 2]
        h, w = 350 + int(rng.integers(-20, 20)), 400 + int(rng.integers(-20, 20))
        top, left = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        Image.fromarray(img[top:top + h, left:left + w]).save(root / "a" / f"{i}.jpg", quality=90)
    return root


class _SeedStyle(torch.utils.data.Dataset):
    """The seed's CPU pipeline: every augmentation in PIL, then ToTensor (float in [0, 1]), two views per sample."""

    def __init__(self, source, size: int, s: float = 1.0):
        from torchvision import transforms as T

        jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.source = source
        self.transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                                    T.RandomApply([jitter], p=0.8), T.RandomGrayscale(p=0.2), T.ToTensor()])

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        image, _ = self.source[i]
        return self.transform(image), self.transform(image)


def _decoded_count(items) -> int:
    """ImageFolder has decoded each JPEG (PIL convert); return a count, not the pixels (no transfer cost)."""
    return sum(np.asarray(img).shape[0] > 0 for img, _ in items)


def _rate(iterator_factory, batch: int, budget_s: float) -> float:
    """samples/s over whole epochs, after one untimed warm-up epoch (worker start-up, JIT compilation)."""
    for _ in iterator_factory():
        pass
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        for _ in iterator_factory():
            count += batch
    return count / (time.perf_counter() - start)


def stock_ffcv_loader(beton: Path, size: int, batch: int, workers: int):
    """Two stock FFCV pipelines (RandomResizedCropRGBImageDecoder + RandomHorizontalFlip) on one field."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    def spec():
        return PipelineSpec("image", RandomResizedCropRGBImageDecoder((size, size)),
                            [RandomHorizontalFlip(), ToTensor(), ToTorchImage(channels_last=False)])

    threads = torch.get_num_threads()
    loader = Loader(str(beton), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, seed=0,
                    pipelines={"image": spec(), "image2": spec(), "label": None})
    torch.set_num_threads(threads)
    return loader


def measure(root: Path, beton: Path, size: int, batch: int, workers: int, device: torch.device, budget_s: float):
    from torchvision.datasets import ImageFolder

    from data.augment import SimCLRAugment
    from data.ffcv_loader import FFCVTwoViewLoader
    from data.views import Shard, ViewCrop

    source = ImageFolder(str(root))
    out = {}
    ffcv_loader = FFCVTwoViewLoader(str(beton), batch, ViewCrop(size), Shard(seed=0), num_workers=workers)
    epochs = iter(range(10 ** 6))
    out["a_ffcv_two_views"] = _rate(lambda: ffcv_loader.batches(next(epochs)), batch, budget_s)
    threads = torch.get_num_threads()
    stock = stock_ffcv_loader(beton, size, batch, workers)
    out["a0_stock_ffcv_two_pipelines"] = _rate(lambda: stock, batch, budget_s)
    torch.set_num_threads(threads)  # stock FFCV's epochs set it to `workers`
    seed_loader = torch.utils.data.DataLoader(_SeedStyle(source, size), batch_size=batch, num_workers=workers,
                                              shuffle=True, drop_last=True, persistent_workers=workers > 0)
    out["b_torchvision_full_augmentation"] = _rate(lambda: seed_loader, batch, budget_s)
    decode = torch.utils.data.DataLoader(source, batch_size=batch, num_workers=workers, drop_last=True,
                                         collate_fn=_decoded_count, persistent_workers=workers > 0)
    out["c_jpeg_decode_only"] = _rate(lambda: decode, batch, budget_s)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    augment, g = SimCLRAugment(blur_prob=0.5), torch.Generator(device=device).manual_seed(0)
    augment(images, g)
    sync(device)
    start, views = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        augment(images, g)
        views += batch
    sync(device)
    out["d_device_augment_views_per_s"] = views / (time.perf_counter() - start)
    out["d_torch_threads"] = torch.get_num_threads()
    out["ratio_a_over_b"] = out["a_ffcv_two_views"] / out["b_torchvision_full_augmentation"]
    out["ratio_a_over_c"] = out["a_ffcv_two_views"] / out["c_jpeg_decode_only"]
    out["ratio_a_over_a0"] = out["a_ffcv_two_views"] / out["a0_stock_ffcv_two_pipelines"]
    return out


def workers_sweep(beton: Path, size: int, batch: int, budget_s: float) -> dict:
    """FFCV two-view samples/s for 1, 2, 4, ... worker threads up to the CPU count, and the fastest."""
    import os

    from data.ffcv_loader import FFCVTwoViewLoader
    from data.views import Shard, ViewCrop

    rates, workers = {}, 1
    while workers <= (os.cpu_count() or 1):
        loader = FFCVTwoViewLoader(str(beton), batch, ViewCrop(size), Shard(seed=0), num_workers=workers)
        epochs = iter(range(10 ** 6))
        rates[workers] = _rate(lambda: loader.batches(next(epochs)), batch, budget_s)
        workers *= 2
    return {"samples_per_s": rates, "fastest_workers": max(rates, key=rates.get)}


def run(quick: bool = True, device: str = "cpu", workers: int = 2) -> dict:
    dev = resolve_device(device)  # first: a device this machine lacks stops the run before any work
    from data.prepare import ImageEncoding, prepare

    count, budget = (256, 4.0) if quick else (1024, 15.0)
    results = {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photos(Path(tmp), count)
        beton = Path(tmp) / "photos.beton"
        prepare("imagefolder", beton, str(root), encoding=ImageEncoding("jpg", max_resolution=400),
                num_workers=workers)
        torch.set_num_threads(threads)  # importing FFCV set it to 1
        for size in (96, 224):
            results[f"{size}px"] = measure(root, beton, size, 64, workers, dev, budget)
        results["ffcv_workers_sweep_96px"] = workers_sweep(beton, 96, 64, budget / 2)
    return {"benchmark": "loader", "environment": environment(),
            "config": {"device": str(dev), "workers": workers, "images": count, "quick": quick},
            "results": results, "goals": "a >= 3x b and a >= 0.5x c on CPU; on GPU d >= 10x the step's views/s"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser, default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    emit(run(args.quick, args.device, args.workers), args.out)


if __name__ == "__main__":
    main()
