"""The GPU acceptance run: every CUDA path checked and measured on one device, with one verdict and a report.

    bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--beton FILE]      (python -m benchmarks.gpu_check ...)

Checks, each under its own time limit so that the verdict comes within 8 minutes on one GPU:
  a  the CUDA-marked tests (pytest -m cuda)
  b  every step mode (direct, cached, checkpoint) x amp bf16/fp16 x compile off/on: a few steps on one fixed
     batch give finite, falling losses (compile with step_mode=checkpoint: a refusal by the config that names
     both keys is the expected outcome)
  c  resume equals an uninterrupted run (python -m trainer.main twice with max_steps, then once straight)
  d  trainer.plan's peak for one direct step within 15% of torch.cuda.max_memory_allocated
  e  host syncs per step (torch.cuda.set_sync_debug_mode("warn")): loader, device augmentation, bf16 direct step
     with global BN on a 1-rank group, the loop's on-device loss sums; goal 0
  f  views/s and MFU of ResNet-50 at 224 px, bf16, channels_last: direct at 256 images (512 views) per device,
     cached at 1024 images (2048 views, the 8-GPU batch-8192 recipe's per-device batch)
  g  end to end: synthetic uint8 images -> the memory loader's crops -> device augmentation -> direct step
     (and FFCV with --beton), views/s; the device augmentation alone, views/s
  h  GlobalBatchNorm vs nn.SyncBatchNorm, steps/s and host syncs (a 1-rank group: both normalize locally there)
Writes report.json and summary.md to benchmarks/results/<gpu>-<date>/ (format: benchmarks/README.md) and exits
1 unless every check passed. --dry-run runs the same code on the CPU at tiny sizes (a is skipped; CUDA-only
measurements are reported as null): it checks the script, not the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks.common import environment, init_one_process, interleaved_rates, sync
from benchmarks.run import PEAK_BF16_FLOPS
from data.seeding import position_seed

REPO = Path(__file__).parents[1]
TOTAL_BUDGET_S = 455  # the verdict within 8 minutes (gpu.sh stops at 480 s): start-up and the report fit in the rest
GOAL_END_TO_END_VIEWS_PER_S = 4800  # on an H200, ResNet-50 224 px bf16
GOAL_AUGMENT_OVER_STEP = 10.0
GOAL_PLAN_TOLERANCE = 0.15

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
DRY_RUN_BUDGET_FACTOR = 2.5  # a shared CPU is slow: the dry run's limits are looser (it checks code, not speed)
BUDGET_S = {"a_cuda_tests": 70, "b_step_modes": 150, "c_resume": 75, "d_memory_plan": 25, "e_host_syncs": 20,
            "f_throughput_mfu": 55, "g_end_to_end": 35, "h_global_bn_vs_sync_bn": 25}


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises CheckTimeout in the main thread once `seconds` have passed (between Python bytecodes: a CUDA call
    returns first)."""
    def expire(signum, frame):
        raise CheckTimeout(f"time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ============================================================================= shared pieces
def _config(s: dict, model: str, size: int, batch: int, *extra: str):
    """The trainer's config for a check: synthetic data in memory, one rank, no evaluation."""
    from trainer.config import load_config

    return load_config(None, [f"model.base_model={model}", f"model.small_stem={str(size <= 96).lower()}",
                              f"dataset.input_shape=({size},{size},3)", "dataset.name=synthetic",
                              "dataset.loader=memory", f"batch_size={batch}", f"device={s['device']}",
                              "eval.final_probe=false", "eval.knn_monitor=false", *extra])


def _synthetic_steps(batch: int, steps: int) -> list[str]:
    """Overrides for a synthetic set that fills `steps` batches (1% held out for the probe split, no valid split)."""
    return [f"dataset.synthetic_size={(steps + 1) * batch + 8}", "dataset.valid_size=0", "eval.test_fraction=0.01"]


def _quiet_log():
    from trainer.metrics import RunLogger

    return RunLogger("", enabled=False)


def _network(cfg, ctx, bn_impl: str | None = None, compile_backend: str | None = None):
    """(model, model used for training) as trainer.engine.build_network makes them; bn_impl converts BatchNorm
    to global / torch-synchronized BN first (build_network does so only with more than one rank), compile
    wraps with the given torch.compile backend (build_network uses the default, inductor)."""
    import dataclasses

    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.engine import build_network
    from trainer.model import build_model, synchronize_batchnorm

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


def _pieces(cfg, model, device):
    from trainer.loss import NTXentLoss
    from trainer.optim import build_optimizer
    from trainer.step import resolve_amp

    amp_dtype = resolve_amp(cfg.amp, device)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.peak_lr(cfg.batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return NTXentLoss(cfg.loss.temperature), optimizer, scaler, amp_dtype


def _views(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float views of `batch` images, channels_last, made by the device augmentation from uint8 pixels."""
    from data.augment import SimCLRAugment

    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (2, batch, 3, size, size), dtype=torch.uint8, device=device, generator=g)
    augment = SimCLRAugment()
    return tuple(augment(v, g).contiguous(memory_format=torch.channels_last) for v in images)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step_fn(cfg, model, views: int, device, amp_dtype, chunk: int | None = None):
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


# ============================================================================= checks
def check_a_cuda_tests(s: dict, ctx, limit: float, dry: bool) -> dict:
    goal = "pytest -m cuda passes"
    if dry:
        return {"status": "skipped", "goal": goal, "note": "dry run: the CUDA-marked tests need a GPU"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=limit)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", tail)}
    return {"status": "pass" if proc.returncode == 0 else "fail", "goal": goal, "returncode": proc.returncode,
            "summary": tail, **counts, **({} if proc.returncode == 0 else {"output_tail": proc.stdout[-3000:]})}


def check_b_step_modes(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer.config import ConfigError

    backend = "eager" if dry else "inductor"  # the dry run traces with dynamo but skips code generation
    runs, failed = [], []
    for mode in ("direct", "cached", "checkpoint"):
        for amp in ("bf16", "fp16"):
            for compiled in (False, True):
                row = {"step_mode": mode, "amp": amp, "compile": compiled}
                overrides = [f"step_mode={mode}", f"amp={amp}", f"compile={str(compiled).lower()}",
                             "optim.name=sgd", "optim.base_lr=0.1", "optim.lr_scaling=none", "loss.temperature=0.2"]
                try:
                    cfg = _config(s, s["small_model"], s["small_size"], s["small_batch"], *overrides)
                except ConfigError as err:
                    expected = compiled and mode == "checkpoint" and "compile" in str(err) and "step_mode" in str(err)
                    row.update(outcome="refused by the config", message=str(err), ok=expected)
                    runs.append(row)
                    failed += [] if expected else [row]
                    continue
                start = time.perf_counter()
                if compiled:  # fresh dynamo caches: each new model would count towards its recompile limit
                    torch._dynamo.reset()
                model, train_model = _network(cfg, ctx, compile_backend=backend if compiled else None)
                loss_fn, optimizer, scaler, amp_dtype = _pieces(cfg, model, ctx.device)
                views = 2 * cfg.batch_size
                step_fn, chunk = _step_fn(cfg, model, views, ctx.device, amp_dtype, chunk=views // 2)
                x1, x2 = _views(cfg.batch_size, s["small_size"], ctx.device)
                losses = [step_fn(train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)[0]
                          for _ in range(s["steps"])]
                losses = torch.stack(losses).float().tolist()  # host sync: once, after the steps
                ok = all(math.isfinite(v) for v in losses) and min(losses[-2:]) < losses[0]
                row.update(outcome="ran", losses=losses, chunk_views=chunk, ok=ok,
                           seconds=time.perf_counter() - start)
                runs.append(row)
                failed += [] if ok else [row]
                del model, train_model, optimizer
                _free(ctx.device)
    return {"status": "fail" if failed else "pass", "goal": "finite loss, last two steps below the first, "
            "on one fixed batch (SGD lr 0.1); compile+checkpoint refused naming both keys",
            "compile_backend": backend, "runs": runs, "failed": len(failed)}


def _trainer_run(s: dict, out: Path, limit: float, *extra: str) -> None:
    """`python -m trainer.main` on a tiny synthetic run (deterministic algorithms where they exist, warn-only)."""
    args = ["--config", str(REPO / "configs/quickstart.yaml"), "dataset.name=synthetic", "dataset.synthetic_size=96",
            f"dataset.input_shape=({s['small_size']},{s['small_size']},3)", "model.small_stem=true",
            f"model.base_model={s['small_model']}", "model.out_dim=16", "batch_size=16", "epochs=2",
            "log_every_n_steps=2", "eval.final_probe=false", "eval.knn_monitor=false", "optim.warmup_epochs=1",
            f"amp={s['amp']}", f"device={s['device']}", f"output_dir={out}", *extra]
    code = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
            "from trainer.main import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                                     "1")}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=limit)
    if proc.returncode:
        raise RuntimeError(f"trainer.main {' '.join(extra)} exited {proc.returncode}: {proc.stderr[-2000:]}")


def _state_difference(a: dict, b: dict) -> tuple[bool, float]:
    """(bitwise equal, largest absolute difference) over model parameters, buffers and optimizer buffers."""
    pairs = [(a["model"][k], b["model"][k]) for k in a["model"]]
    pairs += [(x[n], y[n]) for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
              for n in x if torch.is_tensor(x[n])]
    equal = all(torch.equal(x, y) for x, y in pairs)
    diff = max(((x.double() - y.double()).abs().max().item() if x.is_floating_point() else
                float((x != y).any())) for x, y in pairs)
    return equal, diff


def check_c_resume(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer import checkpoint

    deadline = time.monotonic() + limit
    with tempfile.TemporaryDirectory() as tmp:
        straight, split, control = Path(tmp, "straight"), Path(tmp, "split"), Path(tmp, "control")
        _trainer_run(s, straight, deadline - time.monotonic())
        total = checkpoint.load_latest(straight)[0]["step"]
        _trainer_run(s, split, deadline - time.monotonic(), f"max_steps={total // 2 + 1}")  # stops mid-epoch
        _trainer_run(s, split, deadline - time.monotonic())  # the same command again resumes
        a, b = checkpoint.load_latest(straight)[0], checkpoint.load_latest(split)[0]
        equal, diff = _state_difference(a, b)
        result = {"steps": total, "resumed_at": total // 2 + 1, "bitwise_equal": equal, "max_abs_difference": diff,
                  "goal": "resumed run bitwise equal to the uninterrupted one (or, where kernels are not "
                          "deterministic, no further from it than a second uninterrupted run is)"}
        if equal:
            return {"status": "pass", **result}
        _trainer_run(s, control, deadline - time.monotonic())  # how far two uninterrupted runs drift apart here
        control_equal, control_diff = _state_difference(a, checkpoint.load_latest(control)[0])
        ok = not control_equal and diff <= 2 * control_diff
        return {"status": "pass" if ok else "fail", **result, "control_bitwise_equal": control_equal,
                "control_max_abs_difference": control_diff}


def check_d_memory_plan(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer.plan import plan
    from trainer.step import train_step

    cfg = _config(s, s["big_model"], s["big_size"], s["plan_batch"], "amp=bf16", "step_mode=direct")
    cuda = ctx.device.type == "cuda"
    total = torch.cuda.get_device_properties(ctx.device).total_memory if cuda else 80 * 2 ** 30
    planned = plan(cfg, 1, float(total), device_type=ctx.device.type)
    _free(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device) if cuda else 0  # what earlier checks left allocated
    model, train_model = _network(cfg, ctx)
    loss_fn, optimizer, scaler, amp_dtype = _pieces(cfg, model, ctx.device)
    measured = None
    for i in range(3):  # two warm-up steps: optimizer state, cuDNN's benchmark choices
        g = torch.Generator(device=ctx.device).manual_seed(i)
        # the loader's uint8 views stay alive through the step, as in the training loop (the plan counts them)
        v1, v2 = torch.randint(0, 256, (2, cfg.batch_size, 3, s["big_size"], s["big_size"]), dtype=torch.uint8,
                               device=ctx.device, generator=g)
        x1, x2 = _views(cfg.batch_size, s["big_size"], ctx.device, seed=i)
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
    _free(ctx.device)
    if measured is None:
        return {"status": "skipped", **result, "note": "dry run: the peak needs CUDA's allocator statistics"}
    result["planned_over_measured"] = result["planned_peak_bytes"] / measured
    ok = abs(result["planned_over_measured"] - 1) <= GOAL_PLAN_TOLERANCE
    return {"status": "pass" if ok else "fail", **result}


def check_e_host_syncs(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer.inputs import build_pretrain_data

    cfg = _config(s, s["big_model"], s["big_size"], s["sync_batch"], "amp=bf16", "step_mode=direct",
                  *_synthetic_steps(s["sync_batch"], 6))
    data = build_pretrain_data(cfg, ctx)
    model, train_model = _network(cfg, ctx, bn_impl="global")
    loss_fn, optimizer, scaler, amp_dtype = _pieces(cfg, model, ctx.device)
    step_fn, _ = _step_fn(cfg, model, 2 * cfg.batch_size, ctx.device, amp_dtype)
    sums = torch.zeros(3, device=ctx.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=ctx.device)
    aug_gen = torch.Generator(device=ctx.device)

    def one_step(step: int, v1, v2):  # what trainer.engine._loop does between log intervals
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
    warmup, counted = 2, 4
    for step in range(warmup):
        one_step(step, *next(batches))
    sync(ctx.device)
    with count_host_syncs(ctx.device) as found:
        for step in range(warmup, warmup + counted):
            one_step(step, *next(batches))
    sync(ctx.device)
    n_bn = sum(type(m).__name__ == "GlobalBatchNorm" for m in model.modules())
    del model, train_model, optimizer
    _free(ctx.device)
    result = {"model": cfg.model.base_model, "global_bn_layers": n_bn, "steps_counted": counted,
              "goal": "0 host syncs per step (bf16, global BN, direct step, memory loader and device augmentation)",
              "note": "global BN on a 1-rank group: no collective runs (it normalizes locally)"}
    if found == [None]:
        return {"status": "skipped", **result, "host_syncs_per_step": None,
                "note": result["note"] + "; dry run: set_sync_debug_mode is CUDA-only (the steps ran)"}
    distinct = sorted(set(found))
    return {"status": "pass" if not found else "fail", **result, "host_syncs_per_step": len(found) / counted,
            "distinct_messages": distinct[:5]}


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
    _free(ctx.device)
    model, train_model = _network(cfg, ctx)
    loss_fn, optimizer, scaler, amp_dtype = _pieces(cfg, model, ctx.device)
    views = 2 * cfg.batch_size
    step_fn, chunk = _step_fn(cfg, model, views, ctx.device, amp_dtype)
    x1, x2 = _views(cfg.batch_size, cfg.dataset.image_size, ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    rate = interleaved_rates({"step": lambda: step_fn(train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)},
                             views, ctx.device, warmup=2, rounds=1, calls_per_round=timed_steps)["step"]
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    del model, train_model, optimizer, x1, x2
    _free(ctx.device)
    return {"step_mode": cfg.step_mode, "views_per_device": views, "chunk_views": chunk, "views_per_s": rate,
            "peak_mem_gib": peak / 2 ** 30 if peak else None}


def check_f_throughput(s: dict, ctx, limit: float, dry: bool) -> dict:
    flops = flops_per_view(s["big_model"], s["big_size"])
    gpu, peak = peak_flops(ctx.device)
    rows = []
    for mode, batch, steps in (("direct", s["direct_batch"], s["timed_steps"]),
                               ("cached", s["cached_batch"], s["cached_timed_steps"])):
        cfg = _config(s, s["big_model"], s["big_size"], batch, "amp=bf16", f"step_mode={mode}",
                      "model.channels_last=true")
        row = _views_per_s(cfg, ctx, steps)
        row["mfu"] = row["views_per_s"] * flops / peak if peak else None
        rows.append(row)
    return {"status": "pass", "model": s["big_model"], "image_size": s["big_size"], "amp": "bf16",
            "channels_last": True, "train_flops_per_view": flops, "peak_bf16_flops": peak, "peak_table_entry": gpu,
            "runs": rows, "goal": "measured (MFU against the device's dense bf16 peak; no pass/fail threshold)"}


def check_g_end_to_end(s: dict, ctx, limit: float, dry: bool, beton: str | None, step_views_per_s: float | None
                       ) -> dict:
    from data.augment import SimCLRAugment
    from trainer.inputs import build_pretrain_data
    from trainer.step import train_step

    batch, size = s["e2e_batch"], s["big_size"]
    steps = s["timed_steps"] + 2
    cfg = _config(s, s["big_model"], size, batch, "amp=bf16", "step_mode=direct", "dataset.blur_prob=0.5",
                  *_synthetic_steps(batch, steps))
    data = build_pretrain_data(cfg, ctx)
    model, train_model = _network(cfg, ctx)
    loss_fn, optimizer, scaler, amp_dtype = _pieces(cfg, model, ctx.device)
    aug_gen = torch.Generator(device=ctx.device)

    def loop(loader, n: int) -> float:
        """views/s of loader -> device augmentation -> direct step over n steps after 2 warm-up steps."""
        batches = loader.batches(0)
        for i in range(n + 2):
            if i == 2:
                sync(ctx.device)
                start = time.perf_counter()
            v1, v2 = next(batches)
            aug_gen.manual_seed(i)
            x1 = data.augment(v1.to(ctx.device, non_blocking=True), generator=aug_gen)
            x2 = data.augment(v2.to(ctx.device, non_blocking=True), generator=aug_gen)
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
            train_step(train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)
        sync(ctx.device)
        return 2 * batch * n / (time.perf_counter() - start)

    result = {"model": s["big_model"], "image_size": size, "per_device_batch": batch,
              "synthetic_views_per_s": loop(data.train, s["timed_steps"])}
    if beton:
        from data.ffcv_loader import FFCVTwoViewLoader

        ffcv = FFCVTwoViewLoader(beton, batch, size, num_workers=max(1, (os.cpu_count() or 2) - 2),
                                 device=ctx.device)
        if ffcv.steps_per_epoch < 3:
            raise ValueError(f"--beton {beton}: {ffcv.steps_per_epoch} batches of {batch}; need at least 3")
        result["ffcv_views_per_s"] = loop(ffcv, min(s["timed_steps"], ffcv.steps_per_epoch - 2))
    else:
        result["ffcv_note"] = "no .beton given (--beton FILE): FFCV not measured"
    del model, train_model, optimizer
    _free(ctx.device)
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

    cfg = _config(s, s["big_model"], s["big_size"], s["bn_batch"], "amp=bf16", "step_mode=direct")
    impls = ["global"] + (["torch"] if ctx.device.type == "cuda" else [])
    cases, syncs = {}, {}
    for impl in impls:
        model, train_model = _network(cfg, ctx, bn_impl=impl)
        loss_fn, optimizer, scaler, amp_dtype = _pieces(cfg, model, ctx.device)
        x1, x2 = _views(cfg.batch_size, s["big_size"], ctx.device)
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
    _free(ctx.device)
    result = {"model": s["big_model"], "per_device_batch": cfg.batch_size, "views_per_s": rates,
              "host_syncs_per_step": syncs, "process_group_ranks": 1,
              "note": "a 1-rank process group: both implementations normalize locally (no collective), so this "
                      "measures their single-device overhead only" + ("" if "torch" in rates else
                                                                      "; nn.SyncBatchNorm has no CPU kernel"),
              "goal": "measured (global BN no slower than nn.SyncBatchNorm)"}
    if "torch" in rates:
        result["global_over_sync_bn"] = rates["global"] / rates["torch"]
    return {"status": "pass", **result}


# ============================================================================= run, verdict, report
def run(dry: bool, beton: str | None = None, budget_s: float = TOTAL_BUDGET_S) -> dict:
    s = SIZES["dry" if dry else "gpu"]
    factor = DRY_RUN_BUDGET_FACTOR if dry else 1.0
    budget_s *= factor
    start = time.monotonic()
    if not dry and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_check: no CUDA device (use --dry-run to check the script on the CPU)")
    ctx = init_one_process("cpu" if dry else "cuda")
    checks: dict = {}
    step_rate = {}

    def record(name: str, fn) -> None:
        remaining = budget_s - (time.monotonic() - start)
        limit = min(BUDGET_S[name] * factor, remaining)
        if limit < 5:
            checks[name] = {"status": "fail", "error": "not run: the 8-minute budget was spent"}
            return
        began = time.monotonic()
        print(f"gpu_check {name} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
        try:
            with time_limit(limit):
                checks[name] = fn(limit)
        except Exception as err:  # noqa: BLE001 - a failed check is reported, the others still run
            checks[name] = {"status": "fail", "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-3000:]}
            _free(ctx.device)
        checks[name]["seconds"] = time.monotonic() - began
        print(f"gpu_check {name}: {checks[name]['status']} ({checks[name]['seconds']:.0f} s)", file=sys.stderr,
              flush=True)

    try:
        record("a_cuda_tests", lambda lim: check_a_cuda_tests(s, ctx, lim, dry))
        record("e_host_syncs", lambda lim: check_e_host_syncs(s, ctx, lim, dry))
        record("d_memory_plan", lambda lim: check_d_memory_plan(s, ctx, lim, dry))
        record("f_throughput_mfu", lambda lim: check_f_throughput(s, ctx, lim, dry))
        direct = next((r for r in checks["f_throughput_mfu"].get("runs", []) if r["step_mode"] == "direct"), None)
        step_rate["direct"] = direct["views_per_s"] if direct else None
        record("g_end_to_end", lambda lim: check_g_end_to_end(s, ctx, lim, dry, beton, step_rate["direct"]))
        record("h_global_bn_vs_sync_bn", lambda lim: check_h_global_bn(s, ctx, lim, dry))
        record("b_step_modes", lambda lim: check_b_step_modes(s, ctx, lim, dry))
        record("c_resume", lambda lim: check_c_resume(s, ctx, lim, dry))
    finally:
        from trainer import distributed
        distributed.shutdown()
    checks = dict(sorted(checks.items()))
    verdict = "fail" if any(c["status"] == "fail" for c in checks.values()) else "pass"
    env = environment()
    return {"verdict": verdict, "dry_run": dry, "device": env.get("gpu") or f"cpu {env['cpu_model']}",
            "elapsed_s": time.monotonic() - start, "budget_s": budget_s, "environment": env,
            "sizes": s, "goals": {"end_to_end_views_per_s_h200": GOAL_END_TO_END_VIEWS_PER_S,
                                  "augment_over_step": GOAL_AUGMENT_OVER_STEP,
                                  "plan_tolerance": GOAL_PLAN_TOLERANCE, "host_syncs_per_step": 0},
            "checks": checks}


def _fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def summary(report: dict) -> str:
    c = report["checks"]
    env = report["environment"]
    lines = [f"# GPU acceptance: **{report['verdict'].upper()}**" + (" (dry run on the CPU)" if report["dry_run"] else ""),
             "", f"{report['device']}; torch {env['torch']}, CUDA {env['cuda']}, commit {env['commit']}, "
             f"{env['time_utc']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget", "",
             "| check | status | key numbers |", "|---|---|---|"]
    numbers = {
        "a_cuda_tests": lambda r: r.get("summary") or r.get("note", ""),
        "b_step_modes": lambda r: f"{sum(x.get('ok', False) for x in r.get('runs', []))}/{len(r.get('runs', []))} "
                                  "combinations as expected",
        "c_resume": lambda r: f"bitwise equal: {r.get('bitwise_equal')}, max |diff| {_fmt(r.get('max_abs_difference'), '.3g')}",
        "d_memory_plan": lambda r: f"planned {_fmt((r.get('planned_peak_bytes') or 0) / 2**30, '.2f')} GiB, measured "
                                   f"{_fmt(r['measured_peak_bytes'] / 2**30 if r.get('measured_peak_bytes') else None, '.2f')} GiB",
        "e_host_syncs": lambda r: f"{_fmt(r.get('host_syncs_per_step'), '.2f')} host syncs per step",
        "f_throughput_mfu": lambda r: "; ".join(f"{x['step_mode']} {x['views_per_device']} views: "
                                                f"{x['views_per_s']:.0f} views/s, MFU {_fmt(x['mfu'], '.1%')}"
                                                for x in r.get("runs", [])),
        "g_end_to_end": lambda r: f"end to end {_fmt(r.get('synthetic_views_per_s'))} views/s (FFCV "
                                  f"{_fmt(r.get('ffcv_views_per_s'))}), augmentation {_fmt(r.get('augment_views_per_s'))}"
                                  f" views/s = {_fmt(r.get('augment_over_step'), '.1f')}x the step",
        "h_global_bn_vs_sync_bn": lambda r: ", ".join(f"{k} {v:.0f} views/s" for k, v in r.get("views_per_s", {}).items()),
    }
    for name, r in c.items():
        try:
            text = r["error"] if "error" in r else numbers[name](r)
        except Exception as err:  # noqa: BLE001 - the summary never hides the report
            text = f"(see report.json: {err})"
        lines.append(f"| {name} | {r['status']} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument("--out", help="report folder (default benchmarks/results/<gpu>-<date>[-dry-run])")
    parser.add_argument("--beton", help="an FFCV .beton of images for check g's FFCV loader")
    args = parser.parse_args(argv)
    report = run(args.dry_run, args.beton)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{report['device']}-{time.strftime('%Y%m%d')}") + \
        ("-dry-run" if args.dry_run else "")
    folder = Path(args.out or REPO / "benchmarks" / "results" / tag)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (folder / "summary.md").write_text(summary(report))
    print(summary(report))
    print(f"wrote {folder}; verdict: {report['verdict']}", file=sys.stderr)
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
