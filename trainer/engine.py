"""The SimCLR training run: a Trainer that builds one RunState, resumes it, runs the loop and evaluates the result.

    run(cfg, ctx) -> Trainer.build() -> Trainer.resume() -> Trainer.fit() [the loop] -> Trainer.finish()

The step itself is trainer.step.train_step (or trainer.cached_step's); the network as it trains comes from
trainer.model.build_network; checkpoint contents and the ranks' resume agreement from trainer.checkpoint.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from data.seeding import position_seed
from trainer import checkpoint, distributed
from trainer.cached_step import cached_train_step, choose_chunk_size
from trainer.config import Config
from trainer.config_load import save_config
from trainer.distributed import DistContext
from trainer.inputs import build_pretrain_data
from trainer.loss import NTXentLoss
from trainer.metrics import RunLogger, StepMeter, write_console
from trainer.model import build_network, random_init_backbone
from trainer.optim import build_optimizer, set_lr
from trainer.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch
from trainer.run_state import RunState, Schedule
from trainer.step import resolve_amp, train_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; no checkpoint was written after it."""


class Preempted(SystemExit):
    """A stop signal arrived; a checkpoint was written. Exits with PREEMPTED_EXIT_CODE (torchrun/SLURM restart it)
    or, after a Ctrl-C, preemption.INTERRUPTED_EXIT_CODE."""

    def __init__(self, code: int = PREEMPTED_EXIT_CODE):
        super().__init__(code)


def run(cfg: Config, ctx: DistContext) -> dict:
    """Pretrains (resuming from output_dir when it holds checkpoints); returns the final metrics."""
    lock = checkpoint.hold_output_dir_on_rank0(cfg.output_dir, ctx, wait_s=cfg.dist_timeout_s / 2)
    log = RunLogger(cfg.output_dir, enabled=ctx.is_main)
    try:
        trainer = Trainer(cfg, ctx, log)
        return trainer.fit(trainer.resume(trainer.build()))
    finally:
        log.close()
        if lock is not None:
            lock.close()


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, log: RunLogger):
        self.cfg, self.ctx, self.log = cfg, ctx, log

    # ------------------------------------------------------------------------- build, resume
    def build(self) -> RunState:
        """Data, network, loss, optimizer, AMP scaler and schedule, in the order that fixes the RNG streams."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            save_config(cfg, f"{cfg.output_dir}/config.yaml")
        data = build_pretrain_data(cfg, ctx)
        schedule = Schedule.of(cfg, data.train.steps_per_epoch)
        model, train_model = build_network(cfg, ctx, self.log)
        loss_fn = NTXentLoss(cfg.loss.temperature, cfg.loss.use_cosine_similarity)
        optimizer = build_optimizer(model, cfg.optim, schedule.peak_lr)
        amp_dtype = resolve_amp(cfg.amp, ctx.device)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
        return RunState(data, model, train_model, loss_fn, optimizer, scaler, amp_dtype, schedule, train_step)

    def resume(self, run: RunState) -> RunState:
        """The newest checkpoint of output_dir (the same on every rank), then the step function: the cached
        step's chunk size is chosen on the restored weights, the same on every rank."""
        cfg, ctx, log = self.cfg, self.ctx, self.log
        state, path = checkpoint.load_resume_state(cfg.output_dir, ctx)  # on the CPU: restore copies to the device
        if state is None:
            log.resumed(0)  # drops the records of an earlier attempt that crashed before its first checkpoint
        else:
            if state.get("world_size") != ctx.world_size:
                log.warn(f"resuming a run of world size {state.get('world_size')} on {ctx.world_size} ranks: "
                         "the data order from here on differs from an uninterrupted run")
            run.progress = checkpoint.restore(state, run, ctx.device)
            log.resumed(run.progress.step)
            log.info(f"resumed from {path} at step {run.progress.step} (epoch {run.progress.epoch})")
        del state
        if cfg.step_mode == "cached":
            chunk = choose_chunk_size(cfg.cached_chunk_size, run.model, 2 * cfg.batch_size // ctx.world_size,
                                      cfg.dataset.image_size, ctx.device, run.amp_dtype)
            run.step_fn = functools.partial(cached_train_step, chunk_size=chunk)
            log.info(f"step_mode=cached: {chunk} views per chunk on every rank")
        s = run.schedule
        log.info(f"world size {ctx.world_size} ({ctx.backend}), device {ctx.device}, global batch {cfg.batch_size} "
                 f"({cfg.batch_size // ctx.world_size}/rank), {s.steps_per_epoch} steps/epoch, {s.stop_step} steps, "
                 f"peak lr {s.peak_lr:.4g}, amp {run.amp_dtype}")
        return run

    # ------------------------------------------------------------------------- the loop
    def fit(self, run: RunState) -> dict:
        """Trains to the schedule's stop step, checkpointing at epoch ends (and every checkpoint_every_n_steps);
        a stop signal (Ctrl-C too) checkpoints and exits (Preempted). Returns finish()'s results."""
        cfg, ctx, p, stop = self.cfg, self.ctx, run.progress, run.schedule.stop_step
        meter, aug_gen = StepMeter(ctx.device), torch.Generator(device=ctx.device)
        slow_steps = distributed.SlowStepWatch(distributed.WorldInfo(ctx.rank, ctx.local_rank, ctx.world_size,
                                                                     ctx.restart_count))
        preemption = PreemptionWatch(ctx.world_size, announce=ctx.local_rank == 0).install()
        try:
            run.train_model.train()
            while p.step < stop:
                epoch_start, epoch_first_step = time.perf_counter(), p.step
                batches = run.data.train.batches(p.epoch, p.step_in_epoch)
                while p.step < stop and p.step_in_epoch < run.schedule.steps_per_epoch:
                    step_start = time.perf_counter()
                    v1, v2 = next(batches)
                    meter.timer.data_wait_s += time.perf_counter() - step_start
                    lr = self._step(run, v1, v2, aug_gen, meter)
                    distributed.set_progress(p.step)
                    slow = slow_steps.observe(p.step, time.perf_counter() - step_start)  # data + step, host time
                    if slow:
                        self.log.warn(slow)
                    if p.step % cfg.log_every_n_steps == 0 or p.step == stop:
                        self._log_interval(run, meter, lr)
                    epoch_done = p.step_in_epoch == run.schedule.steps_per_epoch
                    if epoch_done:
                        p.epoch, p.step_in_epoch = p.epoch + 1, 0
                    self._checkpoint_when_due(run, meter, epoch_done, preemption)
                    if epoch_done:
                        self._end_of_epoch(run, _Rate(p.step - epoch_first_step, time.perf_counter() - epoch_start,
                                                      stop - p.step, cfg.batch_size))
                        break
            if preemption.should_stop():  # it came during the last epoch's end (validation, kNN): no final probe
                self._stop(run, preemption)
        finally:
            preemption.end_of_run()
        return self.finish(run)

    def _step(self, run: RunState, v1: torch.Tensor, v2: torch.Tensor, aug_gen: torch.Generator,
              meter: StepMeter) -> float:
        """One optimizer step on a batch's two views (augmented on the device); returns its learning rate."""
        cfg, device, p = self.cfg, self.ctx.device, run.progress
        aug_gen.manual_seed(position_seed(cfg.seed, self.ctx.rank, p.step))  # the same views on resume
        x1 = run.data.augment(v1.to(device, non_blocking=True), generator=aug_gen)
        x2 = run.data.augment(v2.to(device, non_blocking=True), generator=aug_gen)
        if cfg.model.channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        lr = run.schedule.lr(p.step)
        set_lr(run.optimizer, lr)
        loss, top1 = run.step_fn(run.train_model, run.loss_fn, run.optimizer, run.scaler, x1, x2, run.amp_dtype,
                                 grad_clip=cfg.optim.grad_clip)
        meter.add(p.step, loss, top1)
        p.step += 1
        p.step_in_epoch += 1
        return lr

    def _checkpoint_when_due(self, run: RunState, meter: StepMeter, epoch_done: bool,
                             preemption: PreemptionWatch) -> None:
        """Writes a checkpoint at an epoch end, every checkpoint_every_n_steps, at the last step and when a stop
        signal arrived (then raises Preempted), never after weights that are not finite."""
        cfg, p = self.cfg, run.progress
        periodic = cfg.checkpoint_every_n_steps and p.step % cfg.checkpoint_every_n_steps == 0
        stop_now = preemption.should_stop()
        if epoch_done or periodic or stop_now or p.step == run.schedule.stop_step:
            _check_finite(meter)  # never overwrite a checkpoint with diverged weights
            _check_finite_parameters(run.model, p.step)
            if self.ctx.is_main:
                checkpoint.save(checkpoint.training_state(run, cfg, self.ctx.world_size, self.ctx.device),
                                cfg.output_dir, p.step, cfg.keep_checkpoints)
        if stop_now:
            self._stop(run, preemption)

    def _stop(self, run: RunState, preemption: PreemptionWatch) -> None:
        """After the checkpoint of the current step: every rank exits with the code the stop signal decided."""
        code = preemption.exit_code
        then = ("so the launcher restarts" if code == PREEMPTED_EXIT_CODE else
                "(stopped by the user: Ctrl-C or a closed terminal): rerun the same command to resume")
        self.log.info(f"{preemption.signal_name or 'stop signal'} received: checkpoint at step {run.progress.step} "
                      f"written; exiting with code {code} {then}")
        torch.distributed.barrier()
        raise Preempted(code)

    # ------------------------------------------------------------------------- reports
    def _log_interval(self, run: RunState, meter: StepMeter, lr: float) -> None:
        _check_finite(meter)
        timer, p = meter.timer, run.progress
        mean = distributed.all_reduce_mean(meter.sums[:2] / max(timer.steps, 1)).tolist()  # host sync: interval
        elapsed = timer.elapsed()
        img_per_s = timer.steps * self.cfg.batch_size / elapsed  # images, not views (each image gives two views)
        scalars = {"loss": mean[0], "contrastive_top1": mean[1], "lr": lr, "img_per_s": img_per_s,
                   "step_time_s": elapsed / timer.steps, "data_wait_frac": timer.data_wait_s / elapsed,
                   "epoch": p.epoch + p.step_in_epoch / run.schedule.steps_per_epoch}
        if self.ctx.device.type == "cuda":
            scalars["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self.log.log(p.step, scalars, console=(
            f"step {p.step:>7d}  ep {scalars['epoch']:6.2f}  loss {mean[0]:.4f}  top1 {mean[1]:.3f}  "
            f"lr {lr:.4g}  {img_per_s:8.1f} img/s  {scalars['step_time_s'] * 1e3:7.1f} ms/step  "
            f"data {scalars['data_wait_frac']:.0%}"))
        meter.reset()

    def _end_of_epoch(self, run: RunState, rate: _Rate) -> None:
        """Validation loss and kNN monitor every eval_every_n_epochs; the epoch's pace and the time left."""
        from trainer.evaluation.monitor import backbone_knn, validation_loss

        cfg, ctx, data, epoch = self.cfg, self.ctx, run.data, run.progress.epoch
        scalars = {"epoch_time_s": rate.seconds}
        if epoch % cfg.eval_every_n_epochs == 0:
            if data.valid is not None:
                scalars["valid_loss"], scalars["valid_top1"] = validation_loss(
                    run.model, data.valid, data.augment, run.loss_fn, ctx.device, run.amp_dtype, cfg.seed, epoch)
            if cfg.eval.knn_monitor and data.labeled is not None:
                scalars["knn_top1"] = backbone_knn(run.model.backbone, data.labeled, ctx.device, cfg.eval.knn_k,
                                                   cfg.eval.knn_temperature)["top1"]
        eta = f"  ({rate.eta()})" if rate.steps_left > 0 else ""
        self.log.log(run.progress.step, scalars, kind="epoch", console=f"epoch {epoch} done: " + "  ".join(
            f"{k} {v:.4f}" for k, v in scalars.items()) + eta)
        self.log.flush()

    def finish(self, run: RunState) -> dict:
        """The parameter checksum (every rank prints its own: equal weights on every rank) and, with
        eval.final_probe, the linear probe and kNN of the learned backbone next to its random initialization."""
        cfg, ctx, step = self.cfg, self.ctx, run.progress.step
        checksum = float(sum(p.detach().double().sum() for p in run.model.parameters()))  # host sync: once
        write_console(f"[rank {ctx.rank}] step {step}: parameter checksum {checksum:.12e}")
        results = {"step": step, "checksum": checksum}
        if cfg.eval.final_probe and run.data.labeled is not None:
            from trainer.evaluation.monitor import probe_rows

            results.update(probe_rows(run.model.backbone, random_init_backbone(cfg, ctx.device), run.data.labeled,
                                      ctx.device, cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.seed))
            if ctx.is_main:
                self.log.info("held-out test split, top-1    linear probe      kNN")
                for name in ("simclr", "random_init"):
                    row = results[name]
                    self.log.info(f"  {name + ' backbone':<28s} {row['linear_top1']:>12.1%} {row['knn_top1']:>8.1%}")
            self.log.log(step, {f"{name}/{k}": v for name, row in results.items() if isinstance(row, dict)
                                for k, v in row.items()}, kind="final")
        return results


def _check_finite(meter: StepMeter) -> None:
    bad = distributed.all_reduce_max(meter.first_bad_step.clone()).item()  # host sync: at intervals only
    if bad >= 0 or distributed.all_reduce_max(meter.sums[2:3].clone()).item() > 0:
        raise NonFiniteLossError(f"the loss became non-finite at step {bad}: lower optim.base_lr, enable "
                                 "optim.grad_clip or use amp=bf16; the last checkpoint was left as it was")


def _check_finite_parameters(model: torch.nn.Module, step: int) -> None:
    """Before a checkpoint: the last update may have diverged although its loss was still finite."""
    norms = torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()]))
    if not bool(distributed.all_reduce_max((~torch.isfinite(norms)).any().float().view(1)).item()):
        return
    raise NonFiniteLossError(f"the parameters became non-finite at step {step} (the update of that step "
                             "diverged): lower optim.base_lr or enable optim.grad_clip; the last checkpoint was "
                             "left as it was")


@dataclass(frozen=True)
class _Rate:
    """An epoch's training pace (its evaluation excluded) and the steps the run has left."""

    steps: int
    seconds: float
    steps_left: int
    global_batch_size: int

    def eta(self) -> str:
        """e.g. '2 min 05 s of training left (1.52 steps/s, 389 img/s)'."""
        steps_per_s = self.steps / max(self.seconds, 1e-9)
        left_s = round(self.steps_left / steps_per_s) if steps_per_s > 0 else 0
        return (f"{left_s // 60} min {left_s % 60:02d} s of training left ({steps_per_s:.2f} steps/s, "
                f"{steps_per_s * self.global_batch_size:.0f} img/s)")
