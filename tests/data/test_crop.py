"""The batched random-resized crop + flip against torchvision's RandomResizedCrop, resized_crop and flip applied per
sample with the same boxes, on photographs.

Tolerances: 1e-5 in float (torch's antialiased bilinear weights, rebuilt as matrices); uint8 within 1 level
(torchvision's uint8 CPU kernel uses fixed-point weights); the box distribution within 4 standard errors of
torchvision's over 4,000 boxes.
"""
import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from data import crop as C
from tests.data.photos import photo_crops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# (top, left, h, w) in 48 px images: shrinking and enlarging, whole image, one pixel
BOXES = torch.tensor([[3, 5, 40, 30], [0, 0, 48, 48], [10, 20, 12, 20], [1, 2, 16, 16], [30, 30, 18, 18],
                      [5, 0, 43, 48], [20, 10, 24, 30], [0, 32, 48, 16], [7, 3, 31, 9], [0, 0, 1, 1]])


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Float crops of 48 px in [0, 1], one per box."""
    return photo_crops(len(BOXES), 48).float() / 255


def test_resized_crop_matches_torchvision_antialiased_bilinear(photos):
    """Shrinking (antialiased) and enlarging boxes, and the flip, in float."""
    images, flip = photos, torch.arange(len(BOXES)) % 3 == 0
    ref = []
    for img, box, f in zip(images, BOXES, flip):
        out = TF.resized_crop(img, *box.tolist(), [24, 24], antialias=True)
        ref.append(TF.horizontal_flip(out) if f else out)
    torch.testing.assert_close(C.resized_crop(images, BOXES, 24, flip), torch.stack(ref), atol=1e-5, rtol=0)


def test_resized_crop_uint8_within_one_level_of_torchvision():
    images = photo_crops(len(BOXES), 48, seed=3)
    out = C.resized_crop(images, BOXES, 32).round_().clamp_(0, 255).to(torch.uint8)  # random_resized_crop_flip's
    ref = torch.stack([TF.resized_crop(img, *b.tolist(), [32, 32], antialias=True) for img, b in zip(images, BOXES)])
    assert (out.int() - ref.int()).abs().max() <= 1


def test_crop_boxes_follow_scale_ratio_and_torchvisions_distribution():
    height, width, n = 300, 400, 4000
    top, left, h, w = C.crop_boxes(n, height, width, torch.Generator().manual_seed(0)).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area, log_aspect = (h * w).double() / (height * width), torch.log(w.double() / h)
    slack = 2.0 / 20  # h and w are rounded to integers: up to half a pixel each on a side of >= ~20 px
    assert area.min() >= 0.08 * (1 - slack) and area.max() <= 1.0
    assert log_aspect.min() >= math.log(3 / 4) - slack and log_aspect.max() <= math.log(4 / 3) + slack
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, height, width), (0.08, 1.0), (3 / 4, 4 / 3))
                        for _ in range(n)], dtype=torch.float64)
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    assert abs(area.mean() - ref_area.mean()) < 4 * ref_area.std() / math.sqrt(n)
    assert abs(log_aspect.std() - torch.log(ref[:, 3] / ref[:, 2]).std()) < 0.01
    assert abs(top.double().mean() - ref[:, 0].mean()) < 4 * ref[:, 0].std() / math.sqrt(n)


def test_fallback_center_crop_when_no_try_fits():
    boxes = C.crop_boxes(8, 10, 100, torch.Generator().manual_seed(0), scale=(0.99, 1.0), ratio=(1.0, 1.0))
    assert boxes.tolist() == [[0, 45, 10, 10]] * 8  # torchvision's fallback: the height-limited centered square


def test_random_resized_crop_flip_shape_reproducibility_and_flip_rate():
    images = photo_crops(2000, 16, seed=4)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    out = C.random_resized_crop_flip(images, 16, g(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))  # whole image
    assert out.shape == images.shape and out.dtype == torch.uint8
    same, flipped = (out == images).flatten(1).all(1), (out == images.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and abs(flipped.float().mean() - 0.5) < 0.04
    a = C.random_resized_crop_flip(images[:64], 24, g(1))
    assert torch.equal(a, C.random_resized_crop_flip(images[:64], 24, g(1)))
    assert not torch.equal(a, C.random_resized_crop_flip(images[:64], 24, g(2)))
    floats = C.random_resized_crop_flip(images[:64].float() / 255, 24, g(1))
    assert floats.dtype == torch.float32 and (floats * 255 - a).abs().max() <= 0.5 + 1e-3


@CUDA
def test_cuda_crops_match_cpu_with_a_cpu_generator_and_never_sync():
    images = photo_crops(64, 48, seed=9)
    crops = C.random_resized_crop_flip(images, 32, torch.Generator().manual_seed(0))
    gpu_images = images.cuda()
    torch.cuda.synchronize()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 resize (two matmuls)
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_crops = C.random_resized_crop_flip(gpu_images, 32, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert gpu_crops.device.type == "cuda" and gpu_crops.dtype == torch.uint8
    assert (gpu_crops.cpu().int() - crops.int()).abs().max() <= 1
