"""Two-view FFCV loader: each stored image decoded with two independent, seeded random-resized crops + flips (uint8;
the decoder is data/ffcv_decoder.py), this rank's shard in torch's DistributedSampler order."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from data.views import Shard, ViewCrop

INSTALL_HINT = "FFCV is not installed: run `bash launch/install.sh --ffcv` (or `pip install -e .[ffcv]`)"


def _import_ffcv():
    import importlib.util

    if importlib.util.find_spec("ffcv") is None:
        raise ImportError(INSTALL_HINT)


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

    def __init__(self, indices: np.ndarray, shard: Shard):
        self.indices, self.skip = indices, 0
        self.sampler = DistributedSampler(range(len(indices)), num_replicas=shard.world_size, rank=shard.rank,
                                          shuffle=True, seed=shard.seed, drop_last=True)

    def sample_order(self, epoch: int) -> np.ndarray:
        self.sampler.set_epoch(epoch)
        return self.indices[np.fromiter(self.sampler, dtype=np.int64, count=len(self.sampler))[self.skip:]]


class FFCVTwoViewLoader:
    """Yields (view1, view2) uint8 [batch_size, 3, S, S] for this rank from a .beton written by data.prepare.

    One FFCV pipeline on the 'image' field whose decoder (data/ffcv_decoder.py) decodes each image once and
    random-resized-crops and flips it twice as `crop` says, seeded per sample: a (shard.seed, epoch) gives
    the same batches on every run and thread count. Order: with order='random', this rank's shard is torch's
    DistributedSampler(shuffle, seed, drop_last=True) with explicit rank/world_size (no process group needed);
    'quasi_random' (FFCV's, for data larger than RAM with os_cache=False) is single-rank in FFCV 1.0.2. On CUDA
    the uint8 batch is copied to the device non-blocking and split into the two views there. Views are fresh
    tensors (not FFCV's reused buffers), contiguous [n, 3, S, S].
    FFCV sets torch's intra-op thread count (see _torch_threads_kept); the loader keeps the caller's.
    """

    def __init__(self, beton_path: str, batch_size: int, crop: ViewCrop, shard: Shard | None = None,
                 num_workers: int = 4, device: torch.device | str = "cpu", os_cache: bool = True,
                 order: str = "random"):
        shard = shard or Shard()
        if order not in ("random", "quasi_random"):
            raise ValueError(f"order={order!r}: choose random or quasi_random")
        if order == "quasi_random" and shard.world_size > 1:
            raise ValueError("order=quasi_random is single-rank in FFCV 1.0.2: use order=random with several ranks")
        _import_ffcv()
        with _torch_threads_kept():
            from ffcv.loader import Loader, OrderOption
            from ffcv.pipeline import PipelineSpec
            from ffcv.transforms import ToDevice, ToTensor

            from data.ffcv_decoder import TwoViewCropFlipDecoder

            self.device, self.image_size = torch.device(device), crop.image_size
            transforms = [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda"
                                         else [])
            decoder = TwoViewCropFlipDecoder(crop, seed=shard.seed & 0xFFFF_FFFF_FFFF)
            indices = None if shard.indices is None else np.asarray(shard.indices, dtype=np.int64)
            self.loader = Loader(str(beton_path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                                 order=OrderOption.RANDOM if order == "random" else OrderOption.QUASI_RANDOM,
                                 seed=shard.seed, indices=indices, drop_last=True,
                                 pipelines={"image": PipelineSpec("image", decoder, transforms), "label": None})
        if order == "random":
            self.loader.traversal_order = _ShardOrder(self.loader.indices.astype(np.int64), shard)
        self._epoch = None
        self._reuse_buffers_across_epochs()
        self.steps_per_epoch = len(self.loader.traversal_order.sample_order(0)) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{beton_path}: {len(self.loader.indices)} images cannot fill one batch of "
                             f"{batch_size} per rank on {shard.world_size} rank(s): lower batch_size")

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
