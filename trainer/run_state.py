"""What a training run holds while it runs: one RunState (built by trainer.engine.Trainer, saved and restored by
trainer.checkpoint), its Progress through the data and its learning-rate Schedule."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from trainer.loss import NTXentLoss
from trainer.optim import lr_at


@dataclass
class Progress:
    step: int = 0  # optimizer steps done (global, the schedule's position)
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # batches of `epoch` already consumed


@dataclass(frozen=True)
class Schedule:
    """The run's length and its learning rate: linear warmup, then cosine (trainer.optim.lr_at)."""

    steps_per_epoch: int
    total_steps: int  # epochs x steps_per_epoch: the cosine's length
    stop_step: int  # where this run stops (max_steps may end it before total_steps)
    warmup_steps: int
    peak_lr: float
    final_lr: float

    @classmethod
    def of(cls, cfg, steps_per_epoch: int) -> "Schedule":
        total = cfg.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, min(total, cfg.max_steps) if cfg.max_steps else total,
                   min(total, round(cfg.optim.warmup_epochs * steps_per_epoch)), cfg.optim.peak_lr(cfg.batch_size),
                   cfg.optim.final_lr)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.final_lr)


@dataclass
class RunState:
    """Everything the training loop reads and changes. `model` is the bare SimCLRModel (its state is what a
    checkpoint holds); `train_model` is what the step runs (DDP around it, compiled when asked)."""

    data: object  # trainer.inputs.PretrainData: train loader, validation loader, device augmentation, probe split
    model: nn.Module
    train_model: nn.Module
    loss_fn: NTXentLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    schedule: Schedule
    step_fn: Callable  # trainer.step.train_step, or trainer.cached_step.cached_train_step with its chunk size
    progress: Progress = field(default_factory=Progress)
