"""What the checks of benchmarks/gpu_check.py build on one device: their sizes (GPU and dry run), the trainer's config,
network, optimizer, step function and augmented views, and the counter of host syncs."""
from __future__ import annotations

import contextlib
import functools
import gc
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).parents[1]

# sizes on the GPU and in the dry run (CPU, seconds)
SIZES = {
    "gpu": dict(small_model="resnet8", small_size=32, small_batch=32, steps=6, big_model="resnet50", big_size=224,
                direct_batch=256, cached_batch=1024, plan_batch=128, sync_batch=64, e2e_batch=256, bn_batch=64,
                timed_steps=6, cached_timed_steps=2, device="cuda", amp="bf16"),
    # dry: 8 px and 4 images for the step modes (fp16 autocast on the CPU is ~100x slower than bf16)
    "dry": dict(small_model="resnet8", small_size=8, small_batch=4, steps=3, big_model="resnet8", big_size=16,
                direct_batch=8, cached_batch=16, plan_batch=8, sync_batch=8, e2e_batch=8, bn_batch=8,
                timed_steps=2, cached_timed_steps=1, device="cpu", amp="bf16"),
}


def check_config(s: dict, model: str, size: int, batch: int, *extra: str):
    """The trainer's config for a check: synthetic data in memory, one rank, no evaluation."""
    from trainer.config_load import load_config

    return load_config(None, [f"model.base_model={model}", f"model.small_stem={str(size <= 96).lower()}",
                              f"dataset.input_shape=({size},{size},3)", "dataset.name=synthetic",
                              "dataset.loader=memory", f"batch_size={batch}", f"device={s['device']}",
                              "eval.final_probe=false", "eval.knn_monitor=false", *extra])


def synthetic_steps(batch: int, steps: int) -> list[str]:
    """Overrides for a synthetic set that fills `steps` batches (1% held out for the probe split, no valid split)."""
    return [f"dataset.synthetic_size={(steps + 1) * batch + 8}", "dataset.valid_size=0", "eval.test_fraction=0.01"]


def _quiet_log():
    from trainer.metrics import RunLogger

    return RunLogger("", enabled=False)


def network(cfg, ctx, bn_impl: str | None = None, compile_backend: str | None = None):
    """(model, model used for training) as trainer.model.build_network makes them; bn_impl converts BatchNorm
    to global / torch-synchronized BN first (build_network does so only with more than one rank), compile
    wraps with the given torch.compile backend (build_network uses the default, inductor)."""
    import dataclasses

    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.model import build_model, build_network, synchronize_batchnorm

    if bn_impl is None:
        model, ddp = build_network(dataclasses.replace(cfg, compile=False), ctx, _quiet_log())
    else:  # the trainer's network for a synchronized world, on a group of this one rank
        torch.manual_seed(cfg.seed)
        model = synchronize_batchnorm(build_model(cfg.model), bn_impl, 1, 0, 0).to(ctx.device)
        model.to(memory_format=torch.channels_last)
        cuda = ctx.device.type == "cuda"
        torch.backends.cudnn.benchmark = cuda
        ddp = DDP(model, device_ids=[ctx.device.index] if cuda else None, gradient_as_bucket_view=True,
                  static_graph=cfg.step_mode != "cached", forward_sync_buffers=False)
    if compile_backend:
        ddp = torch.compile(ddp, backend=compile_backend)
    return model, ddp


def training_pieces(cfg, model, device):
    from trainer.loss import NTXentLoss
    from trainer.optim import build_optimizer
    from trainer.step import resolve_amp

    amp_dtype = resolve_amp(cfg.amp, device)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.peak_lr(cfg.batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return NTXentLoss(cfg.loss.temperature), optimizer, scaler, amp_dtype


def augmented_views(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float views of `batch` images, channels_last, made by the device augmentation from uint8 pixels."""
    from data.augment import SimCLRAugment

    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (2, batch, 3, size, size), dtype=torch.uint8, device=device, generator=g)
    augment = SimCLRAugment()
    return tuple(augment(v, g).contiguous(memory_format=torch.channels_last) for v in images)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_function(cfg, model, views: int, device, amp_dtype, chunk: int | None = None):
    from trainer.cached_step import cached_train_step, choose_chunk_size
    from trainer.step import train_step

    if cfg.step_mode != "cached":
        return train_step, None
    chunk = chunk or choose_chunk_size(0, model, views, cfg.dataset.image_size, device, amp_dtype)
    return functools.partial(cached_train_step, chunk_size=chunk), chunk


@contextlib.contextmanager
def count_host_syncs(device: torch.device):
    """Counts synchronizing CUDA calls in the body (torch.cuda.set_sync_debug_mode('warn')); the yielded list
    holds their messages. On the CPU there is nothing to count: the list stays None."""
    if device.type != "cuda":
        yield [None]
        return
    found: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())
