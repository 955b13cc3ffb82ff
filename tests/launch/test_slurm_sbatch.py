"""slurm.sbatch against fake srun / scontrol: one torchrun per node, the loader's workers from the task's CPUs, the
lost-node bound, and a requeue only after a stop request (USR1)."""
import signal
import subprocess
import time

import pytest

from tests.launch.launchers import LAUNCH, RECORDER, REPO, calls, run


def slurm_env(env, **extra):
    return {**env, "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "SLURM_SUBMIT_DIR": str(REPO), **extra}


def test_slurm_runs_one_torchrun_per_node(fakes):
    env, log, _ = fakes
    proc = run("slurm.sbatch", ["--config", "c.yaml", "epochs=1"], slurm_env(env))
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "srun")
    for part in ("--ntasks-per-node=1", "--cpus-per-task=32", "--nnodes=2", "--nproc_per_node=4",
                 "--rdzv-backend=c10d", "--rdzv-endpoint=node01:16234", "--rdzv-id=1234"):
        assert part in line.split()
    # 32 CPUs for 4 processes: 7 loader workers each (one CPU left for the process itself)
    assert line.endswith("-m trainer.main --config c.yaml epochs=1 dataset.num_workers=7")  # after: argparse
    assert not [c for c in calls(log, "scontrol") if "requeue" in c]


@pytest.mark.parametrize("cpus, workers, extra, args", [
    ("2", "1", {}, []), ("64", "15", {}, []), ("8", "3", {"LOADER_WORKERS": "3"}, []),
    ("8", None, {"LOADER_WORKERS": ""}, []), ("8", None, {}, ["dataset.num_workers=5"])])
def test_slurm_sizes_loader_workers_from_its_cpus(fakes, cpus, workers, extra, args):
    env, log, _ = fakes
    proc = run("slurm.sbatch", ["--config", "c.yaml", *args], slurm_env(env, SLURM_CPUS_PER_TASK=cpus, **extra))
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "srun")
    found = [part for part in line.split() if part.startswith("dataset.num_workers=")]
    assert found == ([f"dataset.num_workers={workers}"] if workers else args)


def test_slurm_and_multi_node_run_torchrun_with_the_lost_node_bound(fakes):
    env, log, bin_dir = fakes
    del env["TORCHRUN"]
    python = bin_dir / "python"  # records its arguments and the interface variables it was given
    python.write_text(RECORDER.replace('$*"', '$* GLOO=$GLOO_SOCKET_IFNAME NCCL=$NCCL_SOCKET_IFNAME"'))
    python.chmod(0o755)
    env = {**env, "PYTHON": str(python), "NODE_LOST_TIMEOUT_S": "45", "SOCKET_IFNAME": "eth7"}
    assert run("slurm.sbatch", ["--config", "c.yaml"], slurm_env(env)).returncode == 0
    multi = {**env, "MASTER_ADDR": "10.0.0.1", "NNODES": "2"}
    assert run("multi_node.sh", ["--config", "c.yaml"], multi).returncode == 0
    [srun] = calls(log, "srun")
    assert f" {python} -m trainer.distributed --rejoin-timeout=45 --nnodes=2 " in srun
    [node] = calls(log, "python")
    assert node.startswith("python -m trainer.distributed --rejoin-timeout=45 --nnodes=2 ")
    assert node.endswith("GLOO=eth7 NCCL=eth7")
    bad = run("multi_node.sh", ["--config", "c.yaml"], {**multi, "MASTER_ADDR": "h", "NODE_LOST_TIMEOUT_S": "soon"})
    assert bad.returncode == 2 and "NODE_LOST_TIMEOUT_S='soon'" in bad.stderr


# 143 alone is no stop request: srun also ends with 143 when it terminated the tasks after another failed.
@pytest.mark.parametrize("code", [143, 1])
def test_slurm_does_not_requeue_a_failed_step(fakes, code):
    env, log, _ = fakes
    proc = run("slurm.sbatch", ["--config", "c.yaml"], slurm_env(env, FAKE_SRUN=str(code)))
    assert proc.returncode == code
    assert not [c for c in calls(log, "scontrol") if "requeue" in c]


def test_slurm_forwards_usr1_then_requeues(fakes):
    env, log, _ = fakes
    batch = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config", "c.yaml"], cwd=REPO,
                             env=slurm_env(env, FAKE_SRUN="wait"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not calls(log, "srun") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the fake srun install its trap
    batch.send_signal(signal.SIGUSR1)  # what SLURM's --signal=B:USR1@180 does
    out, err = batch.communicate(timeout=30)
    assert "srun got USR1" in log.read_text(), out + err
    assert "scontrol requeue 1234" in calls(log, "scontrol"), out + err
    assert batch.returncode == 1


def test_slurm_needs_sbatch(fakes):
    env, log, _ = fakes
    proc = run("slurm.sbatch", ["--config", "c.yaml"], env)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr and not calls(log, "srun")
