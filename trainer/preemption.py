"""Stop signals: every rank agrees to stop after the same step, so rank 0 can checkpoint and every rank exit.

SIGTERM / SIGUSR1 (a scheduler's preemption, `scancel --signal=USR1`): checkpoint, exit PREEMPTED_EXIT_CODE.
SIGINT (Ctrl-C) and SIGHUP (the terminal closed: an SSH session that dropped; not under nohup, whose ignored SIGHUP
stays ignored): the same checkpoint, then exit INTERRUPTED_EXIT_CODE, the user's stop that nothing restarts. After
a Ctrl-C, another stop signal at least `abort_after_s` later stops at once (KeyboardInterrupt), losing the steps
since the last checkpoint: a second Ctrl-C of a direct run, or the SIGTERM torchrun sends its workers on a second
Ctrl-C (torchrun starts each worker in a session of its own, so the terminal's Ctrl-C reaches torchrun, which
forwards it). One sooner is the same request (a key pressed twice). Console lines written after the terminal
closed are dropped (trainer.metrics.write_console).
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import torch
import torch.distributed as dist

# 128 + SIGTERM: torchrun restarts a worker group that exits non-zero (under --max-restarts); launch/slurm.sbatch
# requeues the job when it had been sent USR1.
PREEMPTED_EXIT_CODE = 143
# 128 + SIGINT: the user stopped the run (Ctrl-C, a closed terminal); rerunning the same command resumes. The launchers'
# torchrun (trainer/agent.py) does not restart workers that exit with it.
INTERRUPTED_EXIT_CODE = 130
NONE, PREEMPTED, INTERRUPTED = 0, 1, 2  # the decision; the largest any rank saw wins
CTRL_C_NOTICE = ("\nCtrl-C: the run stops after this step and writes a checkpoint (rerun the same command to "
                 "resume); Ctrl-C again, {:g} s from now or later, stops at once without one.\n")


class PreemptionWatch:
    """Records a stop signal and turns it into a decision all ranks share.

    The per-step check is an all_reduce of one int over a CPU (gloo) group, so it never waits on the GPU
    stream: a few tens of microseconds per step on one node. `announce`: print the Ctrl-C notice (the first
    process of each node: the one whose terminal was pressed may be any).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
    USER_SIGNALS = (signal.SIGINT, signal.SIGHUP)  # the user's stop (INTERRUPTED); the others: a scheduler's

    def __init__(self, world_size: int, announce: bool = False, abort_after_s: float = 2.0):
        self.requested = NONE
        self.decision = NONE
        self.signal_name = ""
        self.announce, self.abort_after_s = announce, abort_after_s
        self._interrupted_at: float | None = None
        self._previous = {}
        self._group = None
        if world_size > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self._flag = torch.zeros(1, dtype=torch.int32)

    def install(self) -> "PreemptionWatch":
        for sig in self.SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup: the run is meant to outlive its terminal
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return self

    def end_of_run(self) -> None:
        """After the training loop: uninstall(), unless a stop was decided (should_stop() was True). The process is
        ending then, and torchrun sends SIGTERM to a node's other workers as soon as one has exited, which under the
        default action would turn their clean exit (the decided code) into a death by signal that torchrun reports
        as a crash. The watch keeps recording such signals (a second Ctrl-C after the pause still aborts)."""
        if self.decision == NONE:
            self.uninstall()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        now = time.monotonic()
        if self._interrupted_at is not None:
            if now - self._interrupted_at >= self.abort_after_s:
                raise KeyboardInterrupt
            return
        self.requested = max(self.requested, INTERRUPTED if signum in self.USER_SIGNALS else PREEMPTED)
        if signum != signal.SIGINT:  # a hang-up starts no abort pause: nobody is at the keyboard to press twice
            return
        self._interrupted_at = now
        if self.announce:  # os.write: a print here could re-enter a print the signal interrupted
            with contextlib.suppress(OSError):  # e.g. stderr piped into a `tee` the same Ctrl-C ended
                os.write(2, CTRL_C_NOTICE.format(self.abort_after_s).encode())

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has received a stop signal."""
        self._flag.fill_(self.requested)
        if self._group is not None:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        self.decision = int(self._flag.item())
        return self.decision != NONE

    @property
    def exit_code(self) -> int:
        """The code every rank exits with once should_stop() is True: a Ctrl-C on any rank makes it the user's stop
        (nothing restarts it), else a preemption that torchrun or the scheduler may restart."""
        return INTERRUPTED_EXIT_CODE if self.decision == INTERRUPTED else PREEMPTED_EXIT_CODE
