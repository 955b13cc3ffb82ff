"""Run logging on rank 0: one console line and one JSONL record per interval, TensorBoard scalars; timers."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import time
from pathlib import Path


def write_console(text: str, *, stderr: bool = False) -> None:
    """Prints one line to stdout (stderr=True: to stderr), flushed. When the terminal is gone (it hung up: EIO; a pipe
    whose reader ended: EPIPE) the line is dropped and that descriptor is pointed at /dev/null for the rest of the
    process, so the run goes on to its checkpoint instead of dying of a print (metrics.jsonl and TensorBoard keep
    the record)."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        print(text + "\n", end="", file=stream, flush=True)  # one write: lines of processes sharing a tty stay whole
    except ValueError:  # a closed stream: nothing to write to
        return
    except OSError as err:
        if err.errno not in (errno.EIO, errno.EPIPE):
            return  # e.g. a full disk under `> log`: this line is lost, the next ones may not be
        with contextlib.suppress(OSError, ValueError):  # ValueError: no descriptor (a test's StringIO)
            fd = stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
            stream.flush()  # what the failed write left in the buffer goes to /dev/null too, not to a failing exit


class RunLogger:
    """Writes `metrics.jsonl`, TensorBoard events (tb/) and console lines; a no-op on ranks other than 0."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled, self.tensorboard = enabled, tensorboard
        self.writer = None  # opened at the first record, or by resumed() (one events file per run)
        self.jsonl = None
        if not enabled:
            return
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - open for the run; close()

    def _open_writer(self, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=purge_step)

    def resumed(self, step: int) -> None:
        """The run goes on from a checkpoint at `step`: records of later steps (written before a crash, and
        about to be written again) leave metrics.jsonl, and TensorBoard drops its events after `step`."""
        if not self.enabled:
            return
        self.jsonl.close()
        path = self.out / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= step]
        tmp = path.with_name(".metrics.jsonl.tmp")
        with open(tmp, "w") as f:
            f.write("".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.jsonl = open(path, "a", buffering=1)  # noqa: SIM115 - open for the run; close()
        if self.tensorboard:
            if self.writer is not None:
                self.writer.close()
            self._open_writer(purge_step=step + 1)

    def info(self, message: str) -> None:
        if self.enabled:
            write_console(message)

    def warn(self, message: str) -> None:
        if self.enabled:
            write_console(f"WARNING: {message}", stderr=True)

    def log(self, step: int, scalars: dict, kind: str = "train", console: str | None = None) -> None:
        """One record: JSONL line, TensorBoard scalars under `kind/`, and a console line."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3),
                  **{k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tensorboard and self.writer is None:
            self._open_writer()
        if self.writer is not None:
            for key, value in scalars.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
        if console is not None:
            write_console(console)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.writer = self.jsonl = None


def _step_of(line: str) -> float:
    """A metrics.jsonl record's step; a torn last line (a crash mid-write) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class IntervalTimer:
    """Wall time of a log interval split into waiting for data and the rest (compute + communication)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait_s = 0.0
        self.steps = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class StepMeter:
    """A log interval's sums of loss and contrastive top-1, its count of non-finite losses and the first step that
    had one, kept on the device: adding a step never waits for the device (the values are read at log
    intervals and before checkpoints only)."""

    def __init__(self, device):
        import torch

        self.sums = torch.zeros(3, device=device)  # loss, top1, non-finite count
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.timer = IntervalTimer()

    def add(self, step: int, loss, top1) -> None:
        import torch

        bad = ~torch.isfinite(loss)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)
        self.sums += torch.stack([torch.nan_to_num(loss), top1, bad.float()])
        self.timer.steps += 1

    def reset(self) -> None:
        self.sums.zero_()
        self.timer.reset()
