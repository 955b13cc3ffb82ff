"""Two-view FFCV loader: each stored image decoded with two independent, seeded random-resized crops + flips (uint8)."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

INSTALL_HINT = "FFCV is not installed: run `bash launch/install.sh --ffcv` (or `pip install -e .[ffcv]`)"

# splitmix64 constants: a counter-based generator, so every crop is a pure function of its key (no RNG state)
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_FLIP_DRAW = 40  # draws 0..39: up to 10 crop attempts of 4 uniforms each (as torchvision and FFCV)


def _import_ffcv():
    import importlib.util

    if importlib.util.find_spec("ffcv") is None:
        raise ImportError(INSTALL_HINT)


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


@contextlib.contextmanager
def _torch_threads_kept():
    """FFCV sets torch's intra-op thread count: to 1 when first imported, to num_workers when a loader starts an
    epoch. Puts back the caller's on the way out."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def beton_size(path: str) -> int:
    """Number of samples stored in a .beton."""
    _import_ffcv()
    with _torch_threads_kept():
        from ffcv.reader import Reader

        return int(Reader(str(path)).num_samples)


def _two_view_decoder(image_size: int, scale, ratio, seed: int, flip_prob: float = 0.5):
    """FFCV's RandomResizedCropRGBImageDecoder made two-view and seeded: each stored image is decoded once and
    cropped + resized + flipped twice into a (2, 3, S, S) slot: the two views, channels first, transposed (and
    mirrored) by the worker threads that resized them. Where both crops are at least 2x (4x, 8x) the output side,
    the JPEG is decoded at 1/2 (1/4, 1/8) scale (see _jpeg_reduction).

    Two pipelines on one field would decode every JPEG twice (measured: half the samples/s). FFCV 1.0.2 draws
    crops (and RandomHorizontalFlip its flips) from numba's per-thread global state, which no seed reaches; here
    the draws of a sample come from the key mix(seed, the batch's sample ids in order, its slot, view). The
    order is a function of (seed, epoch), so the crops are too: on every run, any num_workers, any resume point.
    """
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class TwoViewCropFlipDecoder(RandomResizedCropRGBImageDecoder):
        def declare_state_and_memory(self, previous_state):
            self.max_width, self.max_height = (np.uint64(self.metadata[k].max()) for k in ("width", "height"))
            slot = (2, 3, image_size, image_size)
            scratch = self.max_height * self.max_width * np.uint64(3) + np.uint64(3 * image_size * image_size)
            return (replace(previous_state, jit_mode=True, shape=slot, dtype=np.dtype("<u1")),
                    (AllocationQuery(slot, np.dtype("<u1")), AllocationQuery((scratch,), np.dtype("<u1"))))

        def generate_code(self):
            jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            mix_c, crop_c = Compiler.compile(_mix), Compiler.compile(_crop_flip_generator(Compiler.compile(_uniform)))
            planar_c = Compiler.compile(_to_planar)
            reduction_c, scaled_c = Compiler.compile(_jpeg_reduction), Compiler.compile(_scaled)
            scale_a, ratio_a, side, flip_p = np.array(self.scale), np.array(self.ratio), image_size, flip_prob
            image_bytes = int(self.max_height * self.max_width * np.uint64(3))  # then one resized view (S, S, 3)
            with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
                base = _mix(np.uint64(seed))

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

    return TwoViewCropFlipDecoder((image_size, image_size), tuple(scale), tuple(ratio))


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


def _fresh(view: torch.Tensor) -> torch.Tensor:
    """A copy of `view`. On the CPU a single-threaded one (numpy's): torch's intra-op threads would spin for
    cores the decoding threads are using (measured: 224-px samples/s 1,940 with 1 torch thread, 1,580 with 2)."""
    return view.clone() if view.is_cuda else torch.from_numpy(view.numpy().copy())


class _ShardOrder:
    """torch's DistributedSampler(shuffle, seed, drop_last=True) over `indices`, for explicit rank/world_size.

    Replaces FFCV 1.0.2's distributed order, which pads the last rank with repeated samples (drop_last=False)
    and takes rank and world size from an initialized torch.distributed group. Same order as the torchvision
    loader for the same seed.
    """

    def __init__(self, indices: np.ndarray, rank: int, world_size: int, seed: int):
        self.indices, self.skip = indices, 0
        self.sampler = DistributedSampler(range(len(indices)), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)

    def sample_order(self, epoch: int) -> np.ndarray:
        self.sampler.set_epoch(epoch)
        return self.indices[np.fromiter(self.sampler, dtype=np.int64, count=len(self.sampler))[self.skip:]]


class FFCVTwoViewLoader:
    """Yields (view1, view2) uint8 [batch_size, 3, S, S] for this rank from a .beton written by data.prepare.

    One FFCV pipeline on the 'image' field whose decoder (see _two_view_decoder) decodes each image once and
    random-resized-crops (scale, ratio) and flips it (flip_prob) twice, seeded per sample: a (seed, epoch) gives
    the same batches on every run and thread count. Order: with order='random', this rank's shard is torch's
    DistributedSampler(shuffle, seed, drop_last=True) with explicit rank/world_size (no process group needed);
    'quasi_random' (FFCV's, for data larger than RAM with os_cache=False) is single-rank in FFCV 1.0.2. On CUDA
    the uint8 batch is copied to the device non-blocking and split into the two views there. Views are fresh
    tensors (not FFCV's reused buffers), contiguous [n, 3, S, S].
    FFCV sets torch's intra-op thread count (see _torch_threads_kept); the loader keeps the caller's.
    """

    def __init__(self, beton_path: str, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 4, device: torch.device | str = "cpu", indices=None,
                 os_cache: bool = True, order: str = "random", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip_prob: float = 0.5):
        if order not in ("random", "quasi_random"):
            raise ValueError(f"order={order!r}: choose random or quasi_random")
        if order == "quasi_random" and world_size > 1:
            raise ValueError("order=quasi_random is single-rank in FFCV 1.0.2: use order=random with several ranks")
        _import_ffcv()
        with _torch_threads_kept():
            from ffcv.loader import Loader, OrderOption
            from ffcv.pipeline import PipelineSpec
            from ffcv.transforms import ToDevice, ToTensor

            self.device, self.image_size = torch.device(device), image_size
            transforms = [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda"
                                         else [])
            decoder = _two_view_decoder(image_size, scale, ratio, seed=seed & 0xFFFF_FFFF_FFFF, flip_prob=flip_prob)
            self.loader = Loader(str(beton_path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                                 order=OrderOption.RANDOM if order == "random" else OrderOption.QUASI_RANDOM,
                                 seed=seed, indices=None if indices is None else np.asarray(indices, dtype=np.int64),
                                 drop_last=True, pipelines={"image": PipelineSpec("image", decoder, transforms),
                                                            "label": None})
        if order == "random":
            self.loader.traversal_order = _ShardOrder(self.loader.indices.astype(np.int64), rank, world_size, seed)
        self._epoch = None
        self._reuse_buffers_across_epochs()
        self.steps_per_epoch = len(self.loader.traversal_order.sample_order(0)) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{beton_path}: {len(self.loader.indices)} images cannot fill one batch of "
                             f"{batch_size} per rank on {world_size} rank(s): lower batch_size")

    def _reuse_buffers_across_epochs(self) -> None:
        """FFCV 1.0.2 allocates every batch buffer afresh at each epoch start (batches_ahead + 2 slots of output
        and decode scratch: ~280 MB at 224 px, batch 64), and the first touch of those pages costs each epoch a
        pause; allocate them once instead. Safe because one epoch runs at a time (see batches)."""
        graph, self._buffers = self.loader.graph, {}
        allocate, buffers = graph.allocate_memory, self._buffers

        def allocate_once(batch_size, batch_slots):
            if (batch_size, batch_slots) not in buffers:
                buffers[batch_size, batch_slots] = allocate(batch_size, batch_slots)
            return buffers[batch_size, batch_slots]

        graph.allocate_memory = allocate_once

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from `start_step` on. order='random' leaves the skipped batches out of the order
        (never loaded; crops depend on a batch's own samples only, so they are those of an uninterrupted
        epoch); with 'quasi_random' they are decoded and dropped. One epoch runs at a time: starting another
        stops the one before (they share FFCV's buffers)."""
        self._stop_epoch()
        self.loader.next_epoch = epoch  # FFCV's order for an epoch is sample_order(epoch)
        sharded = isinstance(self.loader.traversal_order, _ShardOrder)
        if sharded:
            self.loader.traversal_order.skip, start_step = start_step * self.loader.batch_size, 0
        try:
            with _torch_threads_kept():
                self._epoch = iterator = iter(self.loader)
        finally:
            if sharded:
                self.loader.traversal_order.skip = 0
        try:
            step = 0
            while True:
                if self._epoch is not iterator:  # checked before waiting on a queue that may never fill again
                    raise RuntimeError(f"epoch {epoch} of {self.loader.reader.file_name} was left unfinished for "
                                       "another: one epoch of a loader runs at a time")
                batch = next(iterator, None)
                if batch is None:
                    return
                if step >= start_step:  # [n, 2, 3, S, S]: both views, channels first; fresh tensors, as FFCV
                    yield _fresh(batch[0][:, 0]), _fresh(batch[0][:, 1])  # reuses its buffers for later batches
                step += 1
        finally:  # stop FFCV's worker thread when the caller leaves the epoch early
            if self._epoch is iterator:  # (a later epoch may have stopped it already)
                self._stop_epoch()

    def _stop_epoch(self, timeout_s: float = 30.0) -> None:
        """Stops the current epoch's FFCV thread: it is given no further batches to decode (it finishes the one
        in hand), and its queue of ready batches is emptied until it has queued its end-of-epoch marker (a put
        that, unlike the others, waits for room) and ended. Should it outlive timeout_s (a batch slower than
        that), the next epoch gets fresh buffers, never ones it still writes."""
        import queue

        iterator, self._epoch = self._epoch, None
        if iterator is None:
            return
        iterator.iter_ixes = iter(())  # FFCV's list of the epoch's remaining batches
        iterator.close()
        deadline = time.monotonic() + timeout_s
        while iterator.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                while True:
                    iterator.output_queue.get_nowait()
            iterator.join(timeout=0.05)
        if iterator.is_alive():
            self._buffers.clear()
        if self.device.type == "cuda":  # its copies into the reused device buffers are finished
            torch.cuda.synchronize(self.device)
