"""The SimCLR training run: build data, model, loss, optimizer and schedule, resume, loop, checkpoint, evaluate."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data.seeding import position_seed
from trainer import checkpoint, distributed
from trainer.config import Config, save_config
from trainer.distributed import DistContext
from trainer.inputs import build_pretrain_data
from trainer.loss import NTXentLoss
from trainer.metrics import IntervalTimer, RunLogger
from trainer.cached_step import cached_train_step, choose_chunk_size
from trainer.model import build_model, enable_activation_checkpointing, synchronize_batchnorm
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch
from trainer.step import resolve_amp, train_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; no checkpoint was written after it."""


class Preempted(SystemExit):
    """A stop signal arrived; a checkpoint was written. Exits with a code that torchrun/SLURM restart."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done (global, the schedule's position)
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # batches of `epoch` already consumed


# ============================================================================= model
def build_network(cfg: Config, ctx: DistContext, log: RunLogger) -> tuple[nn.Module, nn.Module]:
    """(model_without_ddp, model used for training); identical init on every rank (seeded, then DDP broadcast)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.fine_tune_from:
        try:
            weights = checkpoint.load_backbone_weights(cfg.fine_tune_from)
            model.backbone.load_state_dict(weights)
            log.info(f"fine_tune_from={cfg.fine_tune_from}: backbone weights loaded")
        except FileNotFoundError as err:  # the seed's behaviour: say so and train from scratch
            log.warn(f"{err}; training the backbone from scratch")
    if cfg.step_mode == "checkpoint":
        enable_activation_checkpointing(model.backbone)
    synced = cfg.model.sync_bn and ctx.world_size > 1
    if synced:
        model = synchronize_batchnorm(model, cfg.model.sync_bn_impl, ctx.world_size, ctx.rank,
                                      cfg.model.sync_bn_group_size)
    model.to(ctx.device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick cuDNN's fastest kernels once
    every_bn_global = synced and cfg.model.sync_bn_group_size in (0, ctx.world_size)
    ddp = DDP(model, device_ids=[ctx.device.index] if cuda else None,
              gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no second copy
              # the cached step runs several forwards per step under no_sync, which a static graph forbids
              static_graph=cfg.step_mode != "cached",
              # BN buffers are identical on every rank when every layer reduces over all ranks (or there is one
              # rank): nothing to send before each forward (the initial sync still starts every rank from rank 0's)
              forward_sync_buffers=ctx.world_size > 1 and not every_bn_global)
    return model, (torch.compile(ddp) if cfg.compile else ddp)


def random_init_backbone(cfg: Config, device: torch.device) -> nn.Module:
    """The backbone as the seeded initialization made it (the final probe's random-init reference), rebuilt
    without touching the RNG state the run continues with. Rebuilt rather than copied: a copy of the training
    model would carry its BatchNorm layers' process group, which cannot be copied."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model).backbone.to(device)


def training_state(model, optimizer, scaler, progress: Progress, cfg: Config, world_size: int,
                   device: torch.device) -> dict:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "step": progress.step, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
             "rng_cpu": torch.get_rng_state(), "world_size": world_size, "config": cfg.to_dict()}
    if device.type == "cuda":  # this rank's device only: a restart may see fewer devices (CUDA_VISIBLE_DEVICES)
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict, model, optimizer, scaler, device: torch.device) -> Progress:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    cuda_state = state.get("rng_cuda")
    if isinstance(cuda_state, (list, tuple)):  # older checkpoints held every visible device's state
        cuda_state = cuda_state[device.index] if device.type == "cuda" and device.index < len(cuda_state) else None
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
    return Progress(state["step"], state["epoch"], state["step_in_epoch"])


# ============================================================================= run
def run(cfg: Config, ctx: DistContext) -> dict:
    """Pretrains (resuming from output_dir when it holds checkpoints); returns the final metrics."""
    lock = _hold_output_dir(cfg, ctx)
    log = RunLogger(cfg.output_dir, enabled=ctx.is_main)
    try:
        return _run(cfg, ctx, log)
    finally:
        log.close()
        if lock is not None:
            lock.close()


def _agree(ctx: DistContext, problem: str | None, what) -> list:
    """Every rank's (problem, what); raises ResumeError on every rank alike when any rank had a problem, so no
    rank is left waiting in a collective that a failed one skipped."""
    outcomes = [(problem, what)]
    if ctx.world_size > 1:
        outcomes = [None] * ctx.world_size
        torch.distributed.all_gather_object(outcomes, (problem, what))
    failed = [(r, p) for r, (p, _) in enumerate(outcomes) if p is not None]
    if failed:
        raise checkpoint.ResumeError(failed[0][1] if len({p for _, p in failed}) == 1 and len(failed) == len(outcomes)
                                     else "; ".join(f"rank {r}: {p}" for r, p in failed))
    return [w for _, w in outcomes]


def _hold_output_dir(cfg: Config, ctx: DistContext):
    """Rank 0 locks output_dir (see checkpoint.hold_output_dir); all ranks stop together if it cannot."""
    lock, problem = None, None
    if ctx.is_main:
        try:
            # the other ranks wait in the broadcast below: within dist_timeout_s
            lock = checkpoint.hold_output_dir(cfg.output_dir, wait_s=min(checkpoint.LOCK_WAIT_S,
                                                                         cfg.dist_timeout_s / 2))
        except Exception as err:  # noqa: BLE001 - whatever it is, every rank must hear of it
            problem = (str(err) if isinstance(err, checkpoint.ResumeError)
                       else f"output_dir {cfg.output_dir}: {type(err).__name__}: {err}")
    if ctx.world_size > 1:  # only rank 0 can fail here: its outcome is every rank's
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise checkpoint.ResumeError(problem)
    return lock


def _load_resume_state(cfg: Config, ctx: DistContext) -> tuple[dict | None, object]:
    """The checkpoint to resume from, the same on every rank. Each rank reads output_dir itself: on folders that
    are not one shared file system nodes could see different ones and train on silently diverged weights, so
    ranks that would resume different steps (or fail to read) stop together with the reason."""
    state, path, problem = None, None, None
    try:
        state, path = checkpoint.load_latest(cfg.output_dir, quarantine=ctx.is_main)
    except Exception as err:  # noqa: BLE001 - whatever it is, every rank must hear of it
        problem = str(err) if isinstance(err, checkpoint.ResumeError) else f"{type(err).__name__}: {err}"
    steps = _agree(ctx, problem, (state["step"] if state is not None else 0, str(path)))
    if len({s for s, _ in steps}) > 1:
        raise checkpoint.ResumeError(
            "ranks would resume different checkpoints: " + "; ".join(f"rank {r}: step {s} ({p})"
                                                                    for r, (s, p) in enumerate(steps))
            + ". output_dir must be one folder that every node sees the same")
    return state, path


def _run(cfg: Config, ctx: DistContext, log: RunLogger) -> dict:
    if ctx.is_main:
        save_config(cfg, f"{cfg.output_dir}/config.yaml")
    # ---------------------------------------------------------------- data
    data = build_pretrain_data(cfg, ctx)
    steps_per_epoch = data.train.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = min(total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch))
    # ---------------------------------------------------------------- model, loss, optimizer
    model, train_model = build_network(cfg, ctx, log)
    loss_fn = NTXentLoss(cfg.loss.temperature, cfg.loss.use_cosine_similarity)
    peak_lr = cfg.optim.peak_lr(cfg.batch_size)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    amp_dtype = resolve_amp(cfg.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    # ---------------------------------------------------------------- resume
    progress = Progress()
    state, path = _load_resume_state(cfg, ctx)  # on the CPU: restore() copies to the device
    if state is None:
        log.resumed(0)  # records of an earlier attempt that crashed before its first checkpoint
    else:
        if state.get("world_size") != ctx.world_size:
            log.warn(f"resuming a run of world size {state.get('world_size')} on {ctx.world_size} ranks: "
                     "the data order from here on differs from an uninterrupted run")
        progress = restore(state, model, optimizer, scaler, ctx.device)
        log.resumed(progress.step)
        log.info(f"resumed from {path} at step {progress.step} (epoch {progress.epoch})")
    del state
    step_fn = train_step
    if cfg.step_mode == "cached":  # the same chunk size on every rank (the smallest any rank can afford)
        chunk = choose_chunk_size(cfg.cached_chunk_size, model, 2 * cfg.batch_size // ctx.world_size,
                                  cfg.dataset.image_size, ctx.device, amp_dtype)
        step_fn = functools.partial(cached_train_step, chunk_size=chunk)
        log.info(f"step_mode=cached: {chunk} views per chunk on every rank")
    log.info(f"world size {ctx.world_size} ({ctx.backend}), device {ctx.device}, global batch {cfg.batch_size} "
             f"({cfg.batch_size // ctx.world_size}/rank), {steps_per_epoch} steps/epoch, {stop_step} steps, "
             f"peak lr {peak_lr:.4g}, amp {amp_dtype}")
    # ---------------------------------------------------------------- loop
    watch = PreemptionWatch(ctx.world_size).install()
    try:
        _loop(cfg, ctx, log, data, model, train_model, step_fn, loss_fn, optimizer, scaler, amp_dtype, progress,
              steps_per_epoch, stop_step, total_steps, warmup_steps, peak_lr, watch)
    finally:
        watch.uninstall()
    # ---------------------------------------------------------------- final evaluation
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))  # host sync: once, at the end
    print(f"[rank {ctx.rank}] step {progress.step}: parameter checksum {checksum:.12e}", flush=True)
    results = {"step": progress.step, "checksum": checksum}
    if cfg.eval.final_probe and data.labeled is not None:
        from trainer.evaluation.monitor import probe_rows
        initial_backbone = random_init_backbone(cfg, ctx.device)
        results.update(probe_rows(model.backbone, initial_backbone, data.labeled, ctx.device,
                                  cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.seed))
        if ctx.is_main:
            _print_probe(log, results)
        log.log(progress.step, {f"{name}/{k}": v for name, row in results.items() if isinstance(row, dict)
                                for k, v in row.items()}, kind="final")
    return results


def _loop(cfg, ctx, log, data, model, train_model, step_fn, loss_fn, optimizer, scaler, amp_dtype, progress,
          steps_per_epoch, stop_step, total_steps, warmup_steps, peak_lr, watch) -> None:
    device = ctx.device
    sums = torch.zeros(3, device=device)  # loss, top1, non-finite count over the interval (no host sync)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    timer = IntervalTimer()
    aug_gen = torch.Generator(device=device)
    step_watch = distributed.SlowStepWatch(distributed.WorldInfo(ctx.rank, ctx.local_rank, ctx.world_size,
                                                                 ctx.restart_count))
    train_model.train()
    while progress.step < stop_step:
        epoch_start, epoch_first_step = time.perf_counter(), progress.step
        batches = data.train.batches(progress.epoch, progress.step_in_epoch)
        while progress.step < stop_step and progress.step_in_epoch < steps_per_epoch:
            wait_start = step_start = time.perf_counter()
            v1, v2 = next(batches)
            timer.data_wait_s += time.perf_counter() - wait_start
            aug_gen.manual_seed(position_seed(cfg.seed, ctx.rank, progress.step))
            x1 = data.augment(v1.to(device, non_blocking=True), generator=aug_gen)
            x2 = data.augment(v2.to(device, non_blocking=True), generator=aug_gen)
            if cfg.model.channels_last:
                x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
            lr = lr_at(progress.step, total_steps, warmup_steps, peak_lr, cfg.optim.final_lr)
            set_lr(optimizer, lr)
            loss, top1 = step_fn(train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype,
                                 grad_clip=cfg.optim.grad_clip)
            bad = ~torch.isfinite(loss)
            first_bad_step = torch.where(bad & (first_bad_step < 0), progress.step, first_bad_step)
            sums += torch.stack([torch.nan_to_num(loss), top1, bad.float()])
            progress.step += 1
            progress.step_in_epoch += 1
            distributed.set_progress(progress.step)
            slow = step_watch.observe(progress.step, time.perf_counter() - step_start)  # data + step, host time
            if slow:
                log.warn(slow)
            timer.steps += 1
            interval_end = progress.step % cfg.log_every_n_steps == 0 or progress.step == stop_step
            if interval_end:
                _log_interval(cfg, ctx, log, progress, sums, first_bad_step, timer, lr, steps_per_epoch)
                sums.zero_()
                timer.reset()
            epoch_done = progress.step_in_epoch == steps_per_epoch
            if epoch_done:
                progress.epoch += 1
                progress.step_in_epoch = 0
            periodic = cfg.checkpoint_every_n_steps and progress.step % cfg.checkpoint_every_n_steps == 0
            stop_now = watch.should_stop()
            if epoch_done or periodic or stop_now or progress.step == stop_step:
                _check_finite(sums, first_bad_step)  # never overwrite a checkpoint with diverged weights
                _check_finite_parameters(model, progress.step)
                if ctx.is_main:
                    checkpoint.save(training_state(model, optimizer, scaler, progress, cfg, ctx.world_size, device),
                                    cfg.output_dir, progress.step, cfg.keep_checkpoints)
            if stop_now:
                log.info(f"{watch.signal_name or 'stop signal'} received: checkpoint at step {progress.step} "
                         f"written; exiting with code {PREEMPTED_EXIT_CODE} so the launcher restarts")
                torch.distributed.barrier()
                raise Preempted()
            if epoch_done:
                rate = _Rate(progress.step - epoch_first_step, time.perf_counter() - epoch_start,
                             stop_step - progress.step, cfg.batch_size)
                _end_of_epoch(cfg, ctx, log, data, model, loss_fn, amp_dtype, progress, rate)
                break


def _check_finite(sums: torch.Tensor, first_bad_step: torch.Tensor) -> None:
    bad = distributed.all_reduce_max(first_bad_step.clone()).item()  # host sync: at intervals only
    if bad >= 0 or distributed.all_reduce_max(sums[2:3].clone()).item() > 0:
        raise NonFiniteLossError(f"the loss became non-finite at step {bad}: lower optim.base_lr, enable "
                                 "optim.grad_clip or use amp=bf16; the last checkpoint was left as it was")


def _check_finite_parameters(model: nn.Module, step: int) -> None:
    """Before a checkpoint: the last update may have diverged although its loss was still finite."""
    norms = torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()]))
    if not bool(distributed.all_reduce_max((~torch.isfinite(norms)).any().float().view(1)).item()):
        return
    raise NonFiniteLossError(f"the parameters became non-finite at step {step} (the update of that step "
                             "diverged): lower optim.base_lr or enable optim.grad_clip; the last checkpoint was "
                             "left as it was")


def _log_interval(cfg, ctx, log, progress, sums, first_bad_step, timer, lr, steps_per_epoch) -> None:
    _check_finite(sums, first_bad_step)
    mean = distributed.all_reduce_mean(sums[:2] / max(timer.steps, 1)).tolist()  # host sync: log interval
    elapsed = timer.elapsed()
    img_per_s = timer.steps * cfg.batch_size / elapsed  # images, not views (each image gives two views)
    scalars = {"loss": mean[0], "contrastive_top1": mean[1], "lr": lr, "img_per_s": img_per_s,
               "step_time_s": elapsed / timer.steps, "data_wait_frac": timer.data_wait_s / elapsed,
               "epoch": progress.epoch + progress.step_in_epoch / steps_per_epoch}
    if ctx.device.type == "cuda":
        scalars["peak_mem_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    log.log(progress.step, scalars, console=(
        f"step {progress.step:>7d}  ep {scalars['epoch']:6.2f}  loss {mean[0]:.4f}  top1 {mean[1]:.3f}  "
        f"lr {lr:.4g}  {img_per_s:8.1f} img/s  {scalars['step_time_s'] * 1e3:7.1f} ms/step  "
        f"data {scalars['data_wait_frac']:.0%}"))


@dataclass(frozen=True)
class _Rate:
    """An epoch's training pace (its evaluation excluded) and the steps the run has left."""

    steps: int
    seconds: float
    steps_left: int
    global_batch_size: int

    def eta(self) -> str:
        """e.g. '2 min 05 s left (1.52 steps/s, 389 img/s)'."""
        steps_per_s = self.steps / max(self.seconds, 1e-9)
        left_s = round(self.steps_left / steps_per_s) if steps_per_s > 0 else 0
        return (f"{left_s // 60} min {left_s % 60:02d} s of training left ({steps_per_s:.2f} steps/s, "
                f"{steps_per_s * self.global_batch_size:.0f} img/s)")


def _end_of_epoch(cfg, ctx, log, data, model, loss_fn, amp_dtype, progress, rate: _Rate) -> None:
    scalars = {"epoch_time_s": rate.seconds}
    if progress.epoch % cfg.eval_every_n_epochs == 0:
        from trainer.evaluation.monitor import backbone_knn, validation_loss
        if data.valid is not None:
            scalars["valid_loss"], scalars["valid_top1"] = validation_loss(
                model, data.valid, data.augment, loss_fn, ctx.device, amp_dtype, cfg.seed, progress.epoch)
        if cfg.eval.knn_monitor and data.labeled is not None:
            scalars["knn_top1"] = backbone_knn(model.backbone, data.labeled, ctx.device, cfg.eval.knn_k,
                                               cfg.eval.knn_temperature)["top1"]
    eta = f"  ({rate.eta()})" if rate.steps_left > 0 else ""
    log.log(progress.step, scalars, kind="epoch", console=f"epoch {progress.epoch} done: " + "  ".join(
        f"{k} {v:.4f}" for k, v in scalars.items()) + eta)
    log.flush()


def _print_probe(log: RunLogger, results: dict) -> None:
    log.info("held-out test split, top-1    linear probe      kNN")
    for name in ("simclr", "random_init"):
        row = results[name]
        log.info(f"  {name + ' backbone':<28s} {row['linear_top1']:>12.1%} {row['knn_top1']:>8.1%}")
