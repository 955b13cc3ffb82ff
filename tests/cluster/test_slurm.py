"""launch/slurm.sbatch unchanged under a real SLURM on the two namespace nodes: the GPU header refused on a CPU
partition and the documented overrides accepted, a clean run, USR1 preemption with requeue, and a worker killed
inside the job; each ends with the same parameters as one machine running both ranks."""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from trainer import checkpoint

sys.path.insert(0, str(Path(__file__).parent))  # the helpers beside this file (pytest runs in importlib mode)
import nodes as cluster
import slurm_cluster
from nodes import BASE_ENV, REPO, RUN, STEPS, checksums, children, two_nodes, wait_for

_why = cluster.unavailable() or slurm_cluster.unavailable()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# The overrides launch/README.md gives for a partition without GPUs (the header asks for 8 GPUs, 64 CPUs).
CPU_PARTITION = ["--partition=cpu", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=0", "--time=10"]
JOB_ENV = {"MAX_RESTARTS": "1", "NODE_LOST_TIMEOUT_S": "20", "RDZV_JOIN_TIMEOUT_S": "60",
           "SHUTDOWN_TIMEOUT_S": "30"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    with two_nodes(tmp) as made, slurm_cluster.slurm_cluster(tmp / "state", made, BASE_ENV) as running:
        yield running


def submit(slurm, tmp: Path, extra: list[str], args: list[str]) -> int:
    out = tmp / "job-%j.out"
    proc = slurm.run("sbatch", "--parsable", f"--output={out}", f"--chdir={REPO}", *CPU_PARTITION, *extra,
                     str(REPO / "launch/slurm.sbatch"), *RUN, *args, env=JOB_ENV)
    return int(proc.stdout.strip().split(";")[0])


def job_output(tmp: Path, job_id: int) -> str:
    path = tmp / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_gpu_header_is_refused_on_a_cpu_partition_and_the_overrides_fit(slurm):
    """Bug: unchanged, the script asks for 8 GPUs and 64 CPUs per task: refused (or pending for good) here."""
    plain = slurm.run("sbatch", "--test-only", str(REPO / "launch/slurm.sbatch"), check=False)
    assert plain.returncode != 0, plain.stdout + plain.stderr
    fitted = slurm.run("sbatch", "--test-only", *CPU_PARTITION, str(REPO / "launch/slurm.sbatch"), check=False)
    assert fitted.returncode == 0, fitted.stdout + fitted.stderr


def test_clean_job_matches_one_machine(slurm, tmp_path, one_machine):
    job = submit(slurm, tmp_path, [], [f"output_dir={tmp_path / 'out'}"])
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 400)
    text = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    # the loader's workers come from the 2 CPUs SLURM gave the task, not from the header's 64
    assert "2 CPU(s) per node, 1 loader worker(s) per process" in text
    assert checksums(text) == {0: (STEPS, one_machine), 1: (STEPS, one_machine)}


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path, one_machine):
    out = tmp_path / "out"
    job = submit(slurm, tmp_path, [], [f"output_dir={out}"])
    wait_for(lambda: any(int(p.stem.split("_")[1]) >= 4 for p in checkpoint.list_checkpoints(out)), 300,
             "a checkpoint at step 4")
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm.wait_state(job, {"PENDING", "COMPLETED", "FAILED"}, 120)
    text = job_output(tmp_path, job)
    assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", f"{info}\n{text[-4000:]}"
    assert "requeueing job" in text
    stopped_at = max(int(p.stem.split("_")[1]) for p in checkpoint.list_checkpoints(out))
    assert stopped_at < STEPS
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # SLURM holds a requeued job ~2 min
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400)
    text = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert f"at step {stopped_at} " in text  # resumed from the checkpoint written on USR1
    final = checksums(text[text.rindex("(restart 1)"):])
    assert final == {0: (STEPS, one_machine), 1: (STEPS, one_machine)}


def _cmdline(pid: str) -> str:
    """A process's command line, empty for one that ended since it was listed."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_killed_worker_inside_the_job_recovers(slurm, tmp_path, one_machine):
    out = tmp_path / "out"
    job = submit(slurm, tmp_path, [], [f"output_dir={out}"])
    wait_for(lambda: any(int(p.stem.split("_")[1]) >= 4 for p in checkpoint.list_checkpoints(out)), 300,
             "a checkpoint at step 4")
    # node B's torchrun: the process of its namespace whose command line has the rendezvous options
    agents = [int(pid) for pid in cluster.sh("ip", "netns", "pids", slurm.nodes[1].netns).stdout.split()
              if "--rdzv-backend=c10d" in _cmdline(pid)]
    assert len(agents) == 1, agents
    [worker] = children(agents[0])
    os.kill(worker, signal.SIGKILL)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400)
    text = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "0", text[-4000:]
    assert re.search(r"resumed from", text)
    assert checksums(text) == {0: (STEPS, one_machine), 1: (STEPS, one_machine)}
