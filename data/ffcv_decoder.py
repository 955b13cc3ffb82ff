"""FFCV's RandomResizedCropRGBImageDecoder made two-view and seeded (TwoViewCropFlipDecoder), and the numba helpers
its decode runs: a counter-based random stream, torchvision's crop box, the reduced JPEG decode, the planar copy.
Imports FFCV: data.ffcv_loader imports this module only once FFCV is known to be installed."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from data.views import ViewCrop

# splitmix64 constants: a counter-based generator, so every crop is a pure function of its key (no RNG state)
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_FLIP_DRAW = 40  # draws 0..39: up to 10 crop attempts of 4 uniforms each (as torchvision and FFCV)


def _mix(x):
    """splitmix64 finalizer on a uint64 (wraps modulo 2**64)."""
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    return x ^ (x >> _S31)


def _uniform(key, n):
    """The n-th uniform in [0, 1) of the stream `key` (uint64)."""
    x = key + np.uint64(n + 1) * _GOLDEN
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    x = x ^ (x >> _S31)
    return np.float64(x >> _S11) * (1.0 / 9007199254740992.0)


class TwoViewCropFlipDecoder(RandomResizedCropRGBImageDecoder):
    """Decodes each stored image once and crops + resizes + flips it twice into a (2, 3, S, S) slot: the two views,
    channels first, transposed (and mirrored) by the worker threads that resized them. Where both crops are at
    least 2x (4x, 8x) the output side, the JPEG is decoded at 1/2 (1/4, 1/8) scale (see _jpeg_reduction).

    Two pipelines on one field would decode every JPEG twice (measured: half the samples/s). FFCV 1.0.2 draws
    crops (and RandomHorizontalFlip its flips) from numba's per-thread global state, which no seed reaches; here
    the draws of a sample come from the key mix(seed, the batch's sample ids in order, its slot, view). The
    order is a function of (seed, epoch), so the crops are too: on every run, any num_workers, any resume point.
    """

    def __init__(self, crop: ViewCrop, seed: int):
        super().__init__((crop.image_size, crop.image_size), tuple(crop.scale), tuple(crop.ratio))
        self.side, self.flip_prob, self.seed = crop.image_size, crop.flip_prob, seed

    def declare_state_and_memory(self, previous_state):
        self.max_width, self.max_height = (np.uint64(self.metadata[k].max()) for k in ("width", "height"))
        slot = (2, 3, self.side, self.side)
        scratch = self.max_height * self.max_width * np.uint64(3) + np.uint64(3 * self.side * self.side)
        return (replace(previous_state, jit_mode=True, shape=slot, dtype=np.dtype("<u1")),
                (AllocationQuery(slot, np.dtype("<u1")), AllocationQuery((scratch,), np.dtype("<u1"))))

    def generate_code(self):
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        mix_c, crop_c = Compiler.compile(_mix), Compiler.compile(_crop_flip_generator(Compiler.compile(_uniform)))
        planar_c = Compiler.compile(_to_planar)
        reduction_c, scaled_c = Compiler.compile(_jpeg_reduction), Compiler.compile(_scaled)
        scale_a, ratio_a, side, flip_p = np.array(self.scale), np.array(self.ratio), self.side, self.flip_prob
        image_bytes = int(self.max_height * self.max_width * np.uint64(3))  # then one resized view (S, S, 3)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
            base = _mix(np.uint64(self.seed))

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            batch_key = base
            for k in range(len(batch_indices)):
                batch_key = mix_c(batch_key ^ np.uint64(batch_indices[k]))
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                boxes = np.empty((2, 5), dtype=np.int64)  # per view: top, left, height, width, flip
                for view in range(2):
                    key = mix_c(batch_key + np.uint64(2 * dst_ix + view) * np.uint64(0x632BE59BD9B4E019))
                    i, j, h, w, flip = crop_c(height, width, scale_a, ratio_a, flip_p, key)
                    boxes[view, 0], boxes[view, 1], boxes[view, 2], boxes[view, 3] = i, j, h, w
                    boxes[view, 4] = 1 if flip else 0
                denom, scratch = 1, temp_storage[dst_ix]
                if field["mode"] == jpg:
                    denom = reduction_c(boxes, side)
                    imdecode_c(image_data, scratch, height, width, height, width, 0, 0, 1, denom, False, False)
                    rows, cols = (height + denom - 1) // denom, (width + denom - 1) // denom
                    image = scratch[:3 * rows * cols].reshape(rows, cols, 3)
                else:
                    rows, cols = height, width
                    image = image_data.reshape(height, width, 3)
                resized = scratch[image_bytes:image_bytes + 3 * side * side].reshape(side, side, 3)
                for view in range(2):
                    i, j, h, w = boxes[view, 0], boxes[view, 1], boxes[view, 2], boxes[view, 3]
                    top, bottom = scaled_c(i, denom, rows), scaled_c(i + h, denom, rows)
                    left, right = scaled_c(j, denom, cols), scaled_c(j + w, denom, cols)
                    resize_crop_c(image, top, bottom, left, right, resized)  # never empty: see _jpeg_reduction
                    planar_c(resized, destination[dst_ix, view], boxes[view, 4] == 1)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def _jpeg_reduction(boxes, side):
    """The largest d in (1, 2, 4, 8) with every crop side still >= `side` pixels after a 1/d JPEG decode.

    libjpeg-turbo decodes at 1/2, 1/4, 1/8 in the DCT domain (a box-filtered reduction, SIMD like the full decode)
    for a fraction of the work; the crops then shrink from a smaller image. A crop is never upscaled by the
    reduction: it applies only where both views are downscaled by at least 2x anyway (so every reduced crop
    keeps at least `side` pixels a side and is never empty)."""
    smallest = min(min(boxes[0, 2], boxes[0, 3]), min(boxes[1, 2], boxes[1, 3]))
    denom = 1
    while denom < 8 and smallest >= 2 * denom * side:
        denom *= 2
    return denom


def _scaled(coordinate, denom, limit):
    """A full-resolution pixel coordinate in an image decoded at 1/denom, rounded, within [0, limit]."""
    return min((coordinate + denom // 2) // denom, limit)


def _to_planar(image, planes, mirror):
    """Writes an (S, S, 3) image into (3, S, S) planes, mirrored left-right if `mirror`."""
    last = image.shape[1] - 1
    for r in range(image.shape[0]):
        row = image[r]
        for ch in range(3):
            plane_row = planes[ch, r]
            if mirror:
                for c in range(last + 1):
                    plane_row[last - c] = row[c, ch]
            else:
                for c in range(last + 1):
                    plane_row[c] = row[c, ch]


def _crop_flip_generator(uniform):
    """get_random_crop of FFCV 1.0.2 (torchvision's algorithm) with draws from `uniform(key, n)`, plus a flip
    with probability flip_prob."""

    def crop_flip(height, width, scale, ratio, flip_prob, key):
        area, log_ratio = height * width, np.log(ratio)
        flip = uniform(key, _FLIP_DRAW) < flip_prob
        for attempt in range(10):
            target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, 4 * attempt))
            aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(key, 4 * attempt + 1))
            w, h = int(round(np.sqrt(target_area * aspect))), int(round(np.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(uniform(key, 4 * attempt + 2) * (height - h + 1))
                j = int(uniform(key, 4 * attempt + 3) * (width - w + 1))
                return i, j, h, w, flip
        in_ratio = float(width) / float(height)  # fallback: the central crop of the closest allowed ratio
        w, h = int(width), int(height)
        if in_ratio < min(ratio):
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            w = int(round(h * max(ratio)))
        return (int(height) - h) // 2, (int(width) - w) // 2, h, w, flip

    return crop_flip
