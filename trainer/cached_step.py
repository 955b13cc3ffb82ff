"""Large-batch step by embedding-gradient caching: exact NT-Xent gradients with activations held for one chunk at a
time.

Per step: (1) forward this rank's views chunk by chunk without autograd to get every embedding; (2) NT-Xent over
the gathered embeddings and its gradient with respect to each local embedding; (3) re-forward each chunk with
autograd (same RNG state as in pass 1) and backpropagate the cached embedding gradient. DDP synchronizes
gradients once, on the last chunk. Peak activation memory is one chunk's instead of the whole batch's; the
price is a second forward pass. The parameter gradients equal the direct step's exactly for a model without
batch statistics; with BatchNorm each chunk is normalized with its own statistics (as a smaller per-device
batch would be). The running statistics advance once per step, as in the direct step, by the size-weighted
average of the chunks' statistics (see _RunningStatsOncePerStep).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.loss import NTXentLoss
from trainer.model import bn_statistics_frozen
from trainer.step import apply_gradients


class _RunningStatsOncePerStep:
    """Pass 3 runs each BatchNorm layer once per chunk; left alone, its running statistics would take one
    momentum update per chunk (k chunks: 1 - (1 - m)^k of the step's weight instead of m). Instead each chunk's
    statistics are read out (momentum 1 for the chunk) and the step ends with one update by their size-weighted
    average: the running mean then equals the direct step's, the running variance is the mean within-chunk
    variance (what the chunks were normalized with), and num_batches_tracked advances by one."""

    def __init__(self, model: nn.Module, total_views: int):
        self.total = total_views
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.training and m.track_running_stats and m.running_mean is not None]
        self.start = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.layers]
        self.sums = [(torch.zeros_like(m.running_mean), torch.zeros_like(m.running_var)) for m in self.layers]
        for m in self.layers:
            m.momentum = 1.0  # after a chunk's forward, the running buffers hold that chunk's statistics

    def add_chunk(self, views: int) -> None:
        weight = views / self.total
        with torch.no_grad():
            for m, (mean, var) in zip(self.layers, self.sums):
                mean.add_(m.running_mean, alpha=weight)
                var.add_(m.running_var, alpha=weight)

    def finish(self, completed: bool = True) -> None:
        """One update by the chunks' average; or, for a step that did not complete, the statistics it began with."""
        with torch.no_grad():
            for m, (momentum, mean0, var0, tracked0), (mean, var) in zip(self.layers, self.start, self.sums):
                factor = (momentum if momentum is not None else 1.0 / float(tracked0.item() + 1)) if completed else 0.0
                m.momentum = momentum
                m.running_mean.copy_(mean0 * (1 - factor) + mean * factor)
                m.running_var.copy_(var0 * (1 - factor) + var * factor)
                m.num_batches_tracked.copy_(tracked0 + int(completed))


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_train_step(model: nn.Module, loss_fn: NTXentLoss, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, x1: torch.Tensor, x2: torch.Tensor,
                      amp_dtype: torch.dtype | None, chunk_size: int, grad_clip: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for trainer.step.train_step with activations for `chunk_size` views at a time."""
    views = torch.cat([x1, x2])
    chunks = views.split(chunk_size)
    device = views.device
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    # pass 1: embeddings without autograd. BN running statistics stay (momentum 0; they advance in pass 3), but
    # not by restoring a copy: that would undo DDP's broadcast of rank 0's buffers in this pass's first forward
    with torch.no_grad(), autocast, bn_statistics_frozen(model):
        rng_states, embeddings = [], []
        for chunk in chunks:
            rng_states.append(_rng_state(device))
            embeddings.append(model(chunk).float())
    # pass 2: the loss on the gathered embeddings, and its gradient with respect to each local embedding
    z = torch.cat(embeddings).requires_grad_(True)
    loss, top1 = loss_fn(*z.chunk(2), return_accuracy=True)
    (z_grad,) = torch.autograd.grad(scaler.scale(loss), z)
    # pass 3: re-forward each chunk with autograd and push the cached gradient through it
    optimizer.zero_grad(set_to_none=True)
    running_stats = _RunningStatsOncePerStep(model, len(views))
    start = 0
    try:
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                _set_rng_state(rng_states[i], device)
                with autocast:
                    out = model(chunk)
                running_stats.add_chunk(len(chunk))
                out.float().backward(z_grad[start:start + len(chunk)])
            start += len(chunk)
    except BaseException:
        running_stats.finish(completed=False)
        raise
    running_stats.finish()
    apply_gradients(model, optimizer, scaler, grad_clip)
    return loss.detach(), top1


def auto_chunk_size(per_rank_views: int, bytes_per_view: float, free_bytes: float, reserve: float = 0.7) -> int:
    """Largest chunk (a divisor-friendly power of two, at most per_rank_views) whose activations fit in
    `reserve` of the free device memory."""
    budget = max(1, int(free_bytes * reserve / max(bytes_per_view, 1.0)))
    size = 1
    while size * 2 <= min(budget, per_rank_views):
        size *= 2
    return size


def probe_step(model: nn.Module, views: int, image_size: int, device: torch.device,
               amp_dtype: torch.dtype | None) -> None:
    """One training-mode forward + backward on `views` random views that leaves no trace: BatchNorm running
    statistics and counters stay (bn_statistics_frozen), the RNG streams the run continues with stay (forked;
    the random views come from a private generator), gradients are dropped. Pass the model without DDP: the
    probe must not take part in DDP's gradient synchronization."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(views, 3, image_size, image_size, device=device, generator=generator)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bn_statistics_frozen(model), \
            torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(x)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def measure_bytes_per_view(model: nn.Module, image_size: int, device: torch.device,
                           amp_dtype: torch.dtype | None, probe_views: int = 8) -> float:
    """Activation memory of one view in a training forward + backward, measured on CUDA as the difference of
    two probe sizes: what does not grow with the batch (bf16 weight copies, cuDNN workspace) cancels."""
    peaks = []
    for views in (probe_views, 2 * probe_views):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        probe_step(model, views, image_size, device, amp_dtype)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    return max(peaks[1] - peaks[0], 1.0) / probe_views


def local_chunk_size(configured: int, model: nn.Module, per_rank_views: int, image_size: int,
                     device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """This rank's choice: the configured chunk size, or on CUDA the largest that fits its free memory (64 on CPU)."""
    if configured > 0:
        return min(configured, per_rank_views)
    if device.type != "cuda":
        return min(64, per_rank_views)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return auto_chunk_size(per_rank_views, measure_bytes_per_view(model, image_size, device, amp_dtype), free_bytes)


def choose_chunk_size(configured: int, model: nn.Module, per_rank_views: int, image_size: int,
                      device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """The chunk size every rank uses: the smallest of the ranks' own choices. Ranks that chose differently
    would run different numbers of chunks, hence of BatchNorm collectives, and hang."""
    chunk = local_chunk_size(configured, model, per_rank_views, image_size, device, amp_dtype)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return chunk
    agreed = torch.tensor([chunk], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed.item())  # host sync: once, before the first step
