"""single_node.sh and multi_node.sh: the torchrun command line each builds (recorded by a fake torchrun), and the
crash / stop-signal flags every launcher passes to torchrun."""
import shutil

import pytest

from tests.launch.launchers import REPO, calls, flag_values, run

# --- single_node.sh ---------------------------------------------------------------------------------------


def test_single_node_passes_arguments(fakes):
    env, log, _ = fakes
    proc = run("single_node.sh", ["--config", "X", "a=1"], {**env, "NPROC": "3"})
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "torchrun")
    assert line.endswith("--standalone --nproc_per_node=3 -m trainer.main --config X a=1")


def test_single_node_counts_gpus(fakes):
    env, log, _ = fakes
    assert run("single_node.sh", ["--config", "X"], env).returncode == 0  # fake nvidia-smi lists 2 GPUs
    assert run("single_node.sh", ["--config", "X"], {**env, "CUDA_VISIBLE_DEVICES": "3,5,7"}).returncode == 0
    assert run("single_node.sh", ["--config", "X"], {**env, "CUDA_VISIBLE_DEVICES": ""}).returncode == 0
    nprocs = [line.split("--nproc_per_node=")[1].split()[0] for line in calls(log, "torchrun")]
    assert nprocs == ["2", "3", "1"]


def test_single_node_rejects_bad_nproc(fakes):
    env, log, _ = fakes
    proc = run("single_node.sh", ["--config", "X"], {**env, "NPROC": "two"})
    assert proc.returncode != 0 and "NPROC" in proc.stderr and not calls(log, "torchrun")


# --- multi_node.sh ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["MASTER_ADDR", "NNODES"])
def test_multi_node_names_missing_variable(fakes, missing):
    env, log, _ = fakes
    env = {**env, "MASTER_ADDR": "10.0.0.1", "NNODES": "2"}
    del env[missing]
    proc = run("multi_node.sh", ["--config", "c.yaml"], env)
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert not calls(log, "torchrun")


def test_multi_node_passes_rendezvous(fakes):
    env, log, _ = fakes
    env = {**env, "MASTER_ADDR": "10.0.0.1", "NNODES": "2", "NPROC": "4", "NODE_RANK": "1"}
    proc = run("multi_node.sh", ["--config", "c.yaml", "epochs=1"], env)
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "torchrun")
    for part in ("--nnodes=2", "--node-rank=1", "--nproc_per_node=4", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=simclr"):
        assert part in line.split()
    assert line.endswith("-m trainer.main --config c.yaml epochs=1")


def test_multi_node_local_addr_and_rendezvous_host(fakes):
    env, log, _ = fakes
    env = {**env, "MASTER_ADDR": "10.0.0.1", "NNODES": "2"}
    assert run("multi_node.sh", ["--config", "c.yaml"], {**env, "LOCAL_ADDR": "10.0.0.1"}).returncode == 0
    assert run("multi_node.sh", ["--config", "c.yaml"], {**env, "LOCAL_ADDR": "10.0.0.2"}).returncode == 0
    assert run("multi_node.sh", ["--config", "c.yaml"], {**env, "MASTER_ADDR": "127.0.0.1"}).returncode == 0
    host, other, loopback = calls(log, "torchrun")
    assert "--local-addr=10.0.0.1" in host.split() and "--rdzv-conf=join_timeout=600,is_host=true" in host.split()
    assert "--local-addr=10.0.0.2" in other.split() and "--rdzv-conf=join_timeout=600" in other.split()
    if shutil.which("ip"):  # 127.0.0.1 is an address of this host's lo
        assert "--rdzv-conf=join_timeout=600,is_host=true" in loopback.split()


def test_multi_node_rejects_bad_nnodes(fakes):
    env, log, _ = fakes
    proc = run("multi_node.sh", ["--config", "c.yaml"], {**env, "MASTER_ADDR": "h", "NNODES": "two"})
    assert proc.returncode != 0 and "NNODES" in proc.stderr and not calls(log, "torchrun")


# --- torchrun's crash and stop-signal flags, in every launcher ---------------------------------------------

SLURM = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_SUBMIT_DIR": str(REPO)}
MULTI = {"MASTER_ADDR": "10.0.0.1", "NNODES": "2"}
# launcher, its environment, the fake that records torchrun's arguments, default restarts, default shutdown seconds
LAUNCHERS = [("single_node.sh", {}, "torchrun", "0", "120"), ("multi_node.sh", MULTI, "torchrun", "3", "120"),
             ("slurm.sbatch", SLURM, "srun", "3", "150"), ("docker_run.sh", {"GPUS": ""}, "docker", "0", "120"),
             ("docker_run.sh", {"GPUS": "", **MULTI}, "docker", "3", "120")]


@pytest.mark.parametrize("script, extra, program, restarts, shutdown_s", LAUNCHERS,
                         ids=[f"{s}-{'multi' if 'NNODES' in e else 'one'}" for s, e, *_ in LAUNCHERS])
def test_every_launcher_passes_the_signal_flags_once(fakes, tmp_path, script, extra, program, restarts,
                                                     shutdown_s):
    """Each flag once, before the trainer's module (torchrun's option, not the trainer's), with the launcher's
    defaults; MAX_RESTARTS and SHUTDOWN_TIMEOUT_S override them."""
    env, log, _ = fakes
    env = {**env, **extra, "OUTPUT_DIR": str(tmp_path / "out")}
    assert run(script, ["--config", "c.yaml"], env, cwd=tmp_path).returncode == 0
    assert run(script, ["--config", "c.yaml"], {**env, "MAX_RESTARTS": "5", "SHUTDOWN_TIMEOUT_S": "30"},
               cwd=tmp_path).returncode == 0
    default, overridden = calls(log, program)
    for line, want_restarts, want_shutdown_s in ((default, restarts, shutdown_s), (overridden, "5", "30")):
        torchrun_part = line.split(" -m trainer.main ")[0]
        assert flag_values(torchrun_part, "--max-restarts") == [want_restarts]
        assert flag_values(torchrun_part, "--shutdown-timeout") == [want_shutdown_s]
        assert flag_values(torchrun_part, "--signals-to-handle") == ["SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
        assert line.endswith(" -m trainer.main --config c.yaml")
