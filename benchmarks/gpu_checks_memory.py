"""The GPU acceptance run's resource checks: trainer.plan's memory peak against the allocator's (d), and host syncs
per training step (e)."""
from __future__ import annotations

import torch

from benchmarks import gpu_checks_setup as setup
from benchmarks.common import sync
from data.seeding import position_seed

GOAL_PLAN_TOLERANCE = 0.15


def check_d_memory_plan(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer.plan import plan
    from trainer.step import train_step

    cfg = setup.check_config(s, s["big_model"], s["big_size"], s["plan_batch"], "amp=bf16", "step_mode=direct")
    cuda = ctx.device.type == "cuda"
    total = torch.cuda.get_device_properties(ctx.device).total_memory if cuda else 80 * 2 ** 30
    planned = plan(cfg, 1, float(total), device_type=ctx.device.type)
    setup.free_memory(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device) if cuda else 0  # what earlier checks left allocated
    model, train_model = setup.network(cfg, ctx)
    loss_fn, optimizer, scaler, amp_dtype = setup.training_pieces(cfg, model, ctx.device)
    measured = None
    for i in range(3):  # two warm-up steps: optimizer state, cuDNN's benchmark choices
        g = torch.Generator(device=ctx.device).manual_seed(i)
        # the loader's uint8 views stay alive through the step, as in the training loop (the plan counts them)
        v1, v2 = torch.randint(0, 256, (2, cfg.batch_size, 3, s["big_size"], s["big_size"]), dtype=torch.uint8,
                               device=ctx.device, generator=g)
        x1, x2 = setup.augmented_views(cfg.batch_size, s["big_size"], ctx.device, seed=i)
        if cuda and i == 2:
            sync(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
        train_step(train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)
        if cuda and i == 2:
            sync(ctx.device)
            measured = float(torch.cuda.max_memory_allocated(ctx.device) - base)
        del v1, v2, x1, x2
    result = {"model": cfg.model.base_model, "image_size": s["big_size"], "views": 2 * cfg.batch_size,
              "planned_peak_bytes": planned["peak_bytes"]["direct"], "measured_peak_bytes": measured,
              "planned_breakdown": {k: planned[k] for k in ("activation_bytes_per_view", "weight_copy_bytes",
                                                             "model_state_bytes", "input_bytes_per_view",
                                                             "logit_bytes", "cudnn_workspace_bytes")},
              "goal": f"planned within {GOAL_PLAN_TOLERANCE:.0%} of measured"}
    del model, train_model, optimizer
    setup.free_memory(ctx.device)
    if measured is None:
        return {"status": "skipped", **result, "note": "dry run: the peak needs CUDA's allocator statistics"}
    result["planned_over_measured"] = result["planned_peak_bytes"] / measured
    ok = abs(result["planned_over_measured"] - 1) <= GOAL_PLAN_TOLERANCE
    return {"status": "pass" if ok else "fail", **result}


def _loop_host_syncs(cfg, ctx, warmup: int, counted: int) -> tuple[list, int]:
    """The host syncs of `counted` training-loop steps after `warmup` ones (count_host_syncs' list), and how many
    GlobalBatchNorm layers ran. The network and optimizer are freed when this returns."""
    from trainer.inputs import build_pretrain_data

    data = build_pretrain_data(cfg, ctx)
    model, train_model = setup.network(cfg, ctx, bn_impl="global")
    loss_fn, optimizer, scaler, amp_dtype = setup.training_pieces(cfg, model, ctx.device)
    step_fn, _ = setup.step_function(cfg, model, 2 * cfg.batch_size, ctx.device, amp_dtype)
    sums = torch.zeros(3, device=ctx.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=ctx.device)
    aug_gen = torch.Generator(device=ctx.device)

    def one_step(step: int, v1, v2):  # what the trainer's loop does between log intervals
        nonlocal first_bad
        aug_gen.manual_seed(position_seed(cfg.seed, 0, step))
        x1 = data.augment(v1.to(ctx.device, non_blocking=True), generator=aug_gen)
        x2 = data.augment(v2.to(ctx.device, non_blocking=True), generator=aug_gen)
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        loss, top1 = step_fn(train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)
        bad = ~torch.isfinite(loss)
        first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
        sums.add_(torch.stack([torch.nan_to_num(loss), top1, bad.float()]))

    batches = data.train.batches(0)
    for step in range(warmup):
        one_step(step, *next(batches))
    sync(ctx.device)
    with setup.count_host_syncs(ctx.device) as found:
        for step in range(warmup, warmup + counted):
            one_step(step, *next(batches))
    sync(ctx.device)
    return found, sum(type(m).__name__ == "GlobalBatchNorm" for m in model.modules())


def check_e_host_syncs(s: dict, ctx, limit: float, dry: bool) -> dict:
    cfg = setup.check_config(s, s["big_model"], s["big_size"], s["sync_batch"], "amp=bf16", "step_mode=direct",
                             *setup.synthetic_steps(s["sync_batch"], 6))
    counted = 4
    found, n_bn = _loop_host_syncs(cfg, ctx, warmup=2, counted=counted)
    setup.free_memory(ctx.device)
    result = {"model": cfg.model.base_model, "global_bn_layers": n_bn, "steps_counted": counted,
              "goal": "0 host syncs per step (bf16, global BN, direct step, memory loader and device augmentation)",
              "note": "global BN on a 1-rank group: no collective runs (it normalizes locally)"}
    if found == [None]:
        return {"status": "skipped", **result, "host_syncs_per_step": None,
                "note": result["note"] + "; dry run: set_sync_debug_mode is CUDA-only (the steps ran)"}
    distinct = sorted(set(found))
    return {"status": "pass" if not found else "fail", **result, "host_syncs_per_step": len(found) / counted,
            "distinct_messages": distinct[:5]}
