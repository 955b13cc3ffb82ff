"""Faults injected into live torchrun jobs (CPU, gloo, loopback): multi-node rendezvous, a killed worker under
--max-restarts, SIGTERM preemption, Ctrl-C and a closed terminal, a torn latest checkpoint. Each bounded in time."""
import contextlib
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

from trainer import checkpoint

pytestmark = pytest.mark.slow  # fault injection into live torchrun jobs

REPO = Path(__file__).parents[2]
RUN = ["-m", "trainer.main", "--config", "configs/quickstart.yaml", "dataset.name=synthetic",
       "dataset.synthetic_size=192", "dataset.input_shape=(16,16,3)", "batch_size=32", "epochs=4",
       "log_every_n_steps=1", "eval.final_probe=false", "eval.knn_monitor=false", "optim.warmup_epochs=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def checksums(text: str) -> dict[int, str]:
    return {int(r): c for r, c in re.findall(r"\[rank (\d)\] step \d+: parameter checksum (\S+)", text)}


def final_params(output_dir: Path) -> dict:
    return torch.load(checkpoint.list_checkpoints(output_dir)[-1], weights_only=True)


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, "the job ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting for the job"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", *RUN, f"output_dir={out}"), cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_params(out)


def test_two_node_c10d_rendezvous_same_model_on_both(tmp_path, unused_port):
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{unused_port}",
              "--rdzv-id=twonode", *RUN, "max_steps=4", f"output_dir={tmp_path}"]
    nodes = [subprocess.Popen(torchrun(*common), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    sums = {**checksums(outputs[0]), **checksums(outputs[1])}
    assert sorted(sums) == [0, 1] and sums[0] == sums[1]
    assert final_params(tmp_path)["step"] == 4


def test_killed_worker_restarts_and_matches_uninterrupted_run(tmp_path, uninterrupted):
    proc = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1", *RUN,
                                     "checkpoint_every_n_steps=3", f"output_dir={tmp_path}"),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(int(p.stem.split("_")[1]) >= 6 for p in checkpoint.list_checkpoints(tmp_path)), 240, proc)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)  # mid-epoch: 6 steps done of 12 per 2 epochs... more to go
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output
    resumed = final_params(tmp_path)
    assert resumed["step"] == uninterrupted["step"]
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("stop", ["SIGTERM to torchrun", "Ctrl-C"])
def test_a_stop_signal_checkpoints_within_grace_and_resumes(tmp_path, uninterrupted, stop):
    """A scheduler's SIGTERM reaches torchrun; a Ctrl-C in the terminal reaches its foreground process group, where
    torchrun is and its workers are not (each runs in a session of its own): either way torchrun forwards the
    signal, the workers finish their step, rank 0 checkpoints, and the rerun ends where an uninterrupted run does."""
    proc = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", *RUN, f"output_dir={tmp_path}"),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, 240, proc)
        sent = time.time()
        if stop == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
        took = time.time() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    saved = checkpoint.list_checkpoints(tmp_path)
    assert saved, output[-3000:]
    step = torch.load(saved[-1], weights_only=True)["step"]
    assert 0 < step < uninterrupted["step"] and took < 30
    code = 130 if stop == "Ctrl-C" else 143
    assert f"checkpoint at step {step} written; exiting with code {code}" in output, output[-3000:]
    assert "KeyboardInterrupt" not in output
    again = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", *RUN, f"output_dir={tmp_path}"),
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"at step {step} " in again.stdout, again.stderr[-3000:]
    resumed = final_params(tmp_path)
    assert resumed["step"] == uninterrupted["step"]
    for key, value in uninterrupted["model"].items():  # preempted and resumed = never interrupted, bit for bit
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


@contextlib.contextmanager
def _in_a_terminal(argv: list[str]):
    """argv as a shell would run it in a terminal: the session leader of a new session whose controlling terminal is
    a pseudo-terminal, its output drained (and dropped). Yields (process, hang_up); hang_up() closes the terminal
    (the master side), as a dropped SSH connection does. Whatever the process started is killed at the end."""
    master, slave = os.openpty()

    def take_the_terminal():  # after setsid (start_new_session): the slave becomes the controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=take_the_terminal)
    os.close(slave)
    done = threading.Event()

    def drain():  # polls, so that no read holds the master open when the test closes it
        while not done.is_set():
            if select.select([master], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):
                    os.read(master, 65536)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    closed = []

    def hang_up():
        done.set()
        reader.join()
        os.close(master)
        closed.append(True)

    try:
        yield proc, hang_up
    finally:
        if not closed:
            hang_up()
        tree = [proc.pid]
        for pid in tree:  # torchrun's workers run in sessions of their own: find them through their parents
            tree += [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def test_a_closed_terminal_checkpoints_and_resumes(tmp_path, uninterrupted):
    """Bug: when the terminal of a run closed (an SSH session that dropped), the kernel's SIGHUP reached torchrun,
    which forwarded it, and the workers died at once: the steps since the last checkpoint were lost (and a print to
    the closed terminal, EIO, would have ended them as surely). Now a hang-up is the user's stop, as a Ctrl-C: the
    workers finish their step, rank 0 checkpoints, both exit 130, and the rerun ends where an uninterrupted run does."""
    metrics = tmp_path / "metrics.jsonl"

    def logged_steps() -> list[int]:
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []

    with _in_a_terminal(torchrun("--standalone", "--nproc_per_node=2", *RUN, f"output_dir={tmp_path}")) as (proc,
                                                                                                        hang_up):
        # hang up in the step after the first epoch's checkpoint: a run that dies keeps that one only
        wait_for(lambda: checkpoint.list_checkpoints(tmp_path), 240, proc)
        first = torch.load(checkpoint.list_checkpoints(tmp_path)[0], weights_only=True)["step"]
        wait_for(lambda: first + 1 in logged_steps(), 120, proc)
        hang_up()  # SIGHUP to the session's leader (torchrun), EIO on every write to the terminal
        proc.wait(timeout=60)
    step = torch.load(checkpoint.list_checkpoints(tmp_path)[-1], weights_only=True)["step"]
    assert first < step < uninterrupted["step"], (first, step)
    assert max(logged_steps()) == step  # a checkpoint of the last step it took
    again = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", *RUN, f"output_dir={tmp_path}"),
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"at step {step} " in again.stdout, again.stderr[-3000:]
    resumed = final_params(tmp_path)
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


def test_torn_latest_checkpoint_resumes_from_previous(tmp_path):
    first = subprocess.run([sys.executable, *RUN, "max_steps=4", "checkpoint_every_n_steps=2",
                            f"output_dir={tmp_path}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    latest = checkpoint.list_checkpoints(tmp_path)[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    again = subprocess.run([sys.executable, *RUN, "max_steps=6", f"output_dir={tmp_path}"], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert latest.name in again.stderr and "damaged" in again.stderr
    assert "resumed from" in again.stdout and "ckpt_000000002.pt at step 2" in again.stdout


def test_hung_rank_ends_the_job_naming_it(tmp_path):
    proc = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", *RUN, "epochs=50", "dist_timeout_s=8",
                                     f"output_dir={tmp_path}"),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 240, proc)
        time.sleep(3)  # a heartbeat or two
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        hung = sorted(workers)[-1]
        os.kill(int(hung), signal.SIGSTOP)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "did not complete within dist_timeout_s=8" in output
    assert re.search(r"silent \(dead or hung\): rank \d", output), output[-3000:]


def running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_workers_of_a_killed_launcher_checkpoint_and_stop(tmp_path):
    """SIGKILL to torchrun itself: its workers notice the launcher is gone, stop together after a checkpoint
    (as on SIGTERM) instead of training on as orphans."""
    proc = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", *RUN, "epochs=500",
                                     f"output_dir={tmp_path}"),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 240, proc)
        workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2
        proc.kill()
        deadline = time.time() + 60
        while any(running(w) for w in workers):
            assert time.time() < deadline, "the orphaned workers kept running"
            time.sleep(0.2)
        output = proc.stdout.read()
    finally:
        proc.kill()
        for w in workers if "workers" in locals() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
    assert "the launcher" in output and "is gone: stopping" in output, output[-3000:]
    saved = checkpoint.list_checkpoints(tmp_path)
    assert saved and "checkpoint at step" in output
    step = torch.load(saved[-1], weights_only=True)["step"]
    assert f"checkpoint at step {step} written" in output


def test_a_second_job_on_a_held_output_dir_stops_on_every_rank(tmp_path):
    held = checkpoint.hold_output_dir(tmp_path)  # as a running job's rank 0 would
    try:
        proc = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", *RUN, f"output_dir={tmp_path}"),
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        held.close()
    assert proc.returncode != 0 and "ResumeError" not in proc.stderr, proc.stderr[-3000:]  # no worker traceback
    assert proc.stderr.count(f"error: output_dir {tmp_path} is in use by another run (pid {os.getpid()} on ") == 1
    assert "exitcode  : 2" in proc.stderr  # both ranks: torchrun reports the first failure
    assert not checkpoint.list_checkpoints(tmp_path) and not (tmp_path / "metrics.jsonl").exists()
