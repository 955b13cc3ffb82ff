"""The GPU acceptance run's speed checks: views/s and MFU of ResNet-50 (f), loader -> device augmentation -> step
end to end and the augmentation alone (g), GlobalBatchNorm against nn.SyncBatchNorm (h)."""
from __future__ import annotations

import functools
import os
import time

import torch

from benchmarks.common import interleaved_rates, sync
from benchmarks.gpu_checks_setup import (
    augmented_views,
    check_config,
    count_host_syncs,
    free_memory,
    network,
    step_function,
    synthetic_steps,
    training_pieces,
)
from benchmarks.run import PEAK_BF16_FLOPS

GOAL_END_TO_END_VIEWS_PER_S = 4800  # on an H200, ResNet-50 224 px bf16
GOAL_AUGMENT_OVER_STEP = 10.0


def flops_per_view(model_name: str, image_size: int) -> float:
    """Training FLOPs of one view: torch.utils.flop_counter's forward count x 3 (backward = 2 x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.config import ModelConfig
    from trainer.model import build_model

    model = build_model(ModelConfig(base_model=model_name, small_stem=image_size <= 96))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, image_size, image_size))
    return 3.0 * counter.get_total_flops()


def peak_flops(device: torch.device) -> tuple[str | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next(((k, v) for k, v in PEAK_BF16_FLOPS.items() if k in name), (None, None))


def _views_per_s(cfg, ctx, timed_steps: int) -> dict:
    """views/s of the trainer's network on fixed views (two warm-up steps), and its peak memory on CUDA."""
    free_memory(ctx.device)
    model, train_model = network(cfg, ctx)
    loss_fn, optimizer, scaler, amp_dtype = training_pieces(cfg, model, ctx.device)
    views = 2 * cfg.batch_size
    step_fn, chunk = step_function(cfg, model, views, ctx.device, amp_dtype)
    x1, x2 = augmented_views(cfg.batch_size, cfg.dataset.image_size, ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    step = functools.partial(step_fn, train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)
    rate = interleaved_rates({"step": step}, views, ctx.device, warmup=2, rounds=1,
                             calls_per_round=timed_steps)["step"]
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    del model, train_model, optimizer, x1, x2, step
    free_memory(ctx.device)
    return {"step_mode": cfg.step_mode, "views_per_device": views, "chunk_views": chunk, "views_per_s": rate,
            "peak_mem_gib": peak / 2 ** 30 if peak else None}


def check_f_throughput(s: dict, ctx, limit: float, dry: bool) -> dict:
    flops = flops_per_view(s["big_model"], s["big_size"])
    gpu, peak = peak_flops(ctx.device)
    rows = []
    for mode, batch, steps in (("direct", s["direct_batch"], s["timed_steps"]),
                               ("cached", s["cached_batch"], s["cached_timed_steps"])):
        cfg = check_config(s, s["big_model"], s["big_size"], batch, "amp=bf16", f"step_mode={mode}",
                           "model.channels_last=true")
        row = _views_per_s(cfg, ctx, steps)
        row["mfu"] = row["views_per_s"] * flops / peak if peak else None
        rows.append(row)
    return {"status": "pass", "model": s["big_model"], "image_size": s["big_size"], "amp": "bf16",
            "channels_last": True, "train_flops_per_view": flops, "peak_bf16_flops": peak, "peak_table_entry": gpu,
            "runs": rows, "goal": "measured (MFU against the device's dense bf16 peak; no pass/fail threshold)"}


def _pipeline_views_per_s(loader, steps: int, augment, step, device: torch.device) -> float:
    """views/s of loader -> device augmentation -> step(x1, x2) over `steps` steps after 2 warm-up steps."""
    batches, generator = loader.batches(0), torch.Generator(device=device)
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            start = time.perf_counter()
        v1, v2 = next(batches)
        generator.manual_seed(i)
        x1 = augment(v1.to(device, non_blocking=True), generator=generator)
        x2 = augment(v2.to(device, non_blocking=True), generator=generator)
        step(*(x.contiguous(memory_format=torch.channels_last) for x in (x1, x2)))
    sync(device)
    return 2 * v1.shape[0] * steps / (time.perf_counter() - start)


def _loader_rates(s: dict, ctx, beton: str | None) -> dict:
    """views/s end to end from the memory loader's synthetic images (and from FFCV with a .beton), direct step."""
    from trainer.inputs import build_pretrain_data
    from trainer.step import train_step

    batch, size = s["e2e_batch"], s["big_size"]
    cfg = check_config(s, s["big_model"], size, batch, "amp=bf16", "step_mode=direct", "dataset.blur_prob=0.5",
                       *synthetic_steps(batch, s["timed_steps"] + 2))
    data = build_pretrain_data(cfg, ctx)
    model, train_model = network(cfg, ctx)
    loss_fn, optimizer, scaler, amp_dtype = training_pieces(cfg, model, ctx.device)
    step = functools.partial(train_step, train_model, loss_fn, optimizer, scaler, amp_dtype=amp_dtype)
    result = {"model": s["big_model"], "image_size": size, "per_device_batch": batch,
              "synthetic_views_per_s": _pipeline_views_per_s(data.train, s["timed_steps"], data.augment, step,
                                                             ctx.device)}
    if not beton:
        return {**result, "ffcv_note": "no .beton given (--beton FILE): FFCV not measured"}
    from data.ffcv_loader import FFCVTwoViewLoader
    from data.views import ViewCrop

    ffcv = FFCVTwoViewLoader(beton, batch, ViewCrop(size), num_workers=max(1, (os.cpu_count() or 2) - 2),
                             device=ctx.device)
    if ffcv.steps_per_epoch < 3:
        raise ValueError(f"--beton {beton}: {ffcv.steps_per_epoch} batches of {batch}; need at least 3")
    steps = min(s["timed_steps"], ffcv.steps_per_epoch - 2)
    return {**result, "ffcv_views_per_s": _pipeline_views_per_s(ffcv, steps, data.augment, step, ctx.device)}


def check_g_end_to_end(s: dict, ctx, limit: float, dry: bool, beton: str | None, step_views_per_s: float | None
                       ) -> dict:
    from data.augment import SimCLRAugment

    result = _loader_rates(s, ctx, beton)  # its network and optimizer are gone when it returns
    free_memory(ctx.device)
    batch, size = s["e2e_batch"], s["big_size"]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=ctx.device)
    augment, g = SimCLRAugment(blur_prob=0.5), torch.Generator(device=ctx.device).manual_seed(0)
    result["augment_views_per_s"] = interleaved_rates({"augment": lambda: augment(images, g)}, batch, ctx.device,
                                                      warmup=2, rounds=3, calls_per_round=3)["augment"]
    end_to_end = min(v for k, v in result.items() if k.endswith("_views_per_s") and k != "augment_views_per_s")
    result["augment_over_step"] = result["augment_views_per_s"] / step_views_per_s if step_views_per_s else None
    gpu, _ = peak_flops(ctx.device)
    result["goal"] = (f"on an H200: >= {GOAL_END_TO_END_VIEWS_PER_S} views/s end to end; everywhere: device "
                      f"augmentation >= {GOAL_AUGMENT_OVER_STEP:.0f}x the direct step's views/s (check f)")
    if dry:
        return {"status": "skipped", **result, "note": "dry run: rates on the CPU, goals not evaluated"}
    ok = result["augment_over_step"] is not None and result["augment_over_step"] >= GOAL_AUGMENT_OVER_STEP
    if gpu == "H200":
        ok = ok and end_to_end >= GOAL_END_TO_END_VIEWS_PER_S
    else:
        result["note"] = f"the {GOAL_END_TO_END_VIEWS_PER_S} views/s goal is an H200's: not evaluated on this device"
    return {"status": "pass" if ok else "fail", **result}


def check_h_global_bn(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer.step import train_step

    cfg = check_config(s, s["big_model"], s["big_size"], s["bn_batch"], "amp=bf16", "step_mode=direct")
    impls = ["global"] + (["torch"] if ctx.device.type == "cuda" else [])
    cases, syncs = {}, {}
    for impl in impls:
        model, train_model = network(cfg, ctx, bn_impl=impl)
        loss_fn, optimizer, scaler, amp_dtype = training_pieces(cfg, model, ctx.device)
        x1, x2 = augmented_views(cfg.batch_size, s["big_size"], ctx.device)
        step = functools.partial(train_step, train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)
        step()
        sync(ctx.device)
        with count_host_syncs(ctx.device) as found:
            step()
        sync(ctx.device)
        syncs[impl] = None if found == [None] else len(found)
        cases[impl] = step
    rates = interleaved_rates(cases, 2 * cfg.batch_size, ctx.device, warmup=1, rounds=3, calls_per_round=2)
    cases.clear()
    free_memory(ctx.device)
    result = {"model": s["big_model"], "per_device_batch": cfg.batch_size, "views_per_s": rates,
              "host_syncs_per_step": syncs, "process_group_ranks": 1,
              "note": "a 1-rank process group: both implementations normalize locally (no collective), so this "
                      "measures their single-device overhead only" + ("" if "torch" in rates else
                                                                      "; nn.SyncBatchNorm has no CPU kernel"),
              "goal": "measured (global BN no slower than nn.SyncBatchNorm)"}
    if "torch" in rates:
        result["global_over_sync_bn"] = rates["global"] / rates["torch"]
    return {"status": "pass", **result}

