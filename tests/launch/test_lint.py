"""Launch scripts and the Dockerfile: shellcheck, hadolint, bash -n, and each launcher's command line.

The launchers run against fake torchrun / srun / scontrol / docker executables that record their arguments,
so nothing real starts.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = [p for p in sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch", REPO / ".ci" / "run",
                                                         REPO / "benchmarks" / "gpu.sh"] if p.exists()]


def tool(name: str) -> str:
    """The linters come with the test extra, next to this Python (its venv's bin), else on PATH."""
    for folder in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        if (folder / name).exists():
            return str(folder / name)
    path = shutil.which(name)
    assert path, f"{name} is not installed: run bash launch/install.sh --test"
    return path


def test_shellcheck_clean():
    assert LAUNCH / "install.sh" in SCRIPTS and LAUNCH / "slurm.sbatch" in SCRIPTS
    proc = subprocess.run([tool("shellcheck"), "--shell=bash", *map(str, SCRIPTS)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- fakes ------------------------------------------------------------------------------------------------

RECORDER = '#!/usr/bin/env bash\nprintf "%s\\n" "$(basename "$0") $*" >> "$FAKE_LOG"\n'


@pytest.fixture
def fakes(tmp_path):
    """A bin folder first on PATH with recording fakes; returns (env, log path, bin folder)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    log.touch()

    def add(name, body=""):
        path = bin_dir / name
        path.write_text(RECORDER + body)
        path.chmod(0o755)
        return path

    add("torchrun")
    add("docker")
    add("nvidia-smi", 'echo "GPU 0: Fake (UUID: GPU-0)"; echo "GPU 1: Fake (UUID: GPU-1)"\n')
    add("scontrol", '[ "$1 $2" = "show hostnames" ] && printf "node01\\nnode02\\n"\nexit 0\n')
    # srun: FAKE_SRUN=wait waits for USR1 and then exits 1, as torchrun does after forwarding a signal.
    add("srun", 'if [ "${FAKE_SRUN:-0}" = wait ]; then\n'
                '  trap \'echo "srun got USR1" >> "$FAKE_LOG"; exit 1\' USR1\n'
                '  for _ in $(seq 200); do sleep 0.1; done; exit 9\n'
                'fi\nexit "${FAKE_SRUN:-0}"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NPROC", "CUDA_VISIBLE", "NCCL_", "GPUS"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), TORCHRUN=str(bin_dir / "torchrun"))
    return env, log, bin_dir


def run(script, args, env, cwd=REPO):
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def calls(log: Path, program: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith(program + " ")]


# --- single_node.sh ---------------------------------------------------------------------------------------

def test_single_node_passes_arguments(fakes):
    env, log, _ = fakes
    proc = run("single_node.sh", ["--config", "X", "a=1"], {**env, "NPROC": "3"})
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "torchrun")
    assert line.endswith("--standalone --nproc_per_node=3 -m trainer.main --config X a=1")
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in line


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
                 "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=simclr", "--max-restarts=3",
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"):
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


# --- slurm.sbatch -----------------------------------------------------------------------------------------

def slurm_env(env, **extra):
    return {**env, "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "SLURM_SUBMIT_DIR": str(REPO), **extra}


def test_slurm_runs_one_torchrun_per_node(fakes):
    env, log, _ = fakes
    proc = run("slurm.sbatch", ["--config", "c.yaml", "epochs=1"], slurm_env(env))
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "srun")
    for part in ("--ntasks-per-node=1", "--cpus-per-task=32", "--nnodes=2", "--nproc_per_node=4",
                 "--rdzv-backend=c10d", "--rdzv-endpoint=node01:16234", "--rdzv-id=1234",
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"):
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
    assert run("multi_node.sh", ["--config", "c.yaml"], {**env, "MASTER_ADDR": "10.0.0.1", "NNODES": "2"}).returncode == 0
    [srun] = calls(log, "srun")
    assert f" {python} -m trainer.distributed --rejoin-timeout=45 --nnodes=2 " in srun
    [node] = calls(log, "python")
    assert node.startswith("python -m trainer.distributed --rejoin-timeout=45 --nnodes=2 ")
    assert node.endswith("GLOO=eth7 NCCL=eth7")
    bad = run("multi_node.sh", ["--config", "c.yaml"], {**env, "MASTER_ADDR": "h", "NNODES": "2",
                                                     "NODE_LOST_TIMEOUT_S": "soon"})
    assert bad.returncode == 2 and "NODE_LOST_TIMEOUT_S='soon'" in bad.stderr


# 143 alone is no stop request: srun also ends with 143 when it terminated the tasks after another failed.
@pytest.mark.parametrize("code, requeued", [(143, False), (1, False)])
def test_slurm_requeues_only_after_a_stop(fakes, code, requeued):
    env, log, _ = fakes
    proc = run("slurm.sbatch", ["--config", "c.yaml"], slurm_env(env, FAKE_SRUN=str(code)))
    assert proc.returncode == code
    assert ("scontrol requeue 1234" in calls(log, "scontrol")) == requeued


def test_slurm_forwards_usr1_then_requeues(fakes):
    env, log, _ = fakes
    batch = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config", "c.yaml"], cwd=REPO,
                             env=slurm_env(env, FAKE_SRUN="wait"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not calls(log, "srun") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the fake srun install its trap
    batch.send_signal(signal.SIGUSR1)  # what SLURM's --signal=B:USR1@120 does
    out, err = batch.communicate(timeout=30)
    assert "srun got USR1" in log.read_text(), out + err
    assert "scontrol requeue 1234" in calls(log, "scontrol"), out + err
    assert batch.returncode == 1


def test_slurm_needs_sbatch(fakes):
    env, log, _ = fakes
    proc = run("slurm.sbatch", ["--config", "c.yaml"], env)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr and not calls(log, "srun")


# --- docker_run.sh ----------------------------------------------------------------------------------------

def test_docker_run_command(fakes, tmp_path):
    env, log, _ = fakes
    data, out = tmp_path / "datasets", tmp_path / "out"
    data.mkdir()
    (data / "stl10_train_unlabeled.beton").touch()
    (data / "stl10").mkdir()
    (data / "notes.txt").touch()
    env = {**env, "DATA_DIR": str(data), "OUTPUT_DIR": str(out), "NCCL_DEBUG": "INFO", "TORCH_HOME": "/host"}
    proc = run("docker_run.sh", ["--config", "configs/stl10_r18.yaml", "epochs=1"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "docker")
    words = line.split()
    for part in ("--rm", "--ipc=host", "--init", "memlock=-1", "stack=67108864", "simclr-trainer:latest",
                 f"{data}:/data", f"{out}:/workspace/runs", "NCCL_DEBUG", "--standalone", "--nproc_per_node=gpu",
                 f"{os.getuid()}:{os.getgid()}"):
        assert part in words, part
    assert words[words.index("--gpus") + 1] == "all"
    # the configs' relative data/<file> paths resolve inside the image (where data/ is the Python package)
    assert f"{data}/stl10_train_unlabeled.beton:/workspace/data/stl10_train_unlabeled.beton:ro" in words
    assert f"{data}/stl10:/workspace/data/stl10:ro" in words
    assert not [w for w in words if "notes.txt" in w]
    assert "TORCH_HOME" not in words and "--network=host" not in words
    assert line.endswith("torchrun --standalone --max-restarts=0 "
                         "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=120 "
                         "--nproc_per_node=gpu -m trainer.main --config configs/stl10_r18.yaml epochs=1")
    assert out.is_dir()


def test_docker_run_cpu_and_multi_node(fakes, tmp_path):
    env, log, _ = fakes
    env = {**env, "OUTPUT_DIR": str(tmp_path / "out"), "GPUS": "", "MASTER_ADDR": "node0", "NNODES": "2"}
    proc = run("docker_run.sh", ["--config", "c.yaml"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    words = calls(log, "docker")[0].split()
    assert "--gpus" not in words and "--network=host" in words and "--nproc_per_node=1" in words
    assert "--rdzv-endpoint=node0:29500" in words and "--nnodes=2" in words
    assert "trainer.distributed" in words and "--rejoin-timeout=60" in words


def test_docker_run_multi_node_interface_and_local_addr(fakes, tmp_path):
    env, log, _ = fakes
    env = {**env, "OUTPUT_DIR": str(tmp_path / "out"), "GPUS": "", "MASTER_ADDR": "10.9.9.1", "NNODES": "2",
           "SOCKET_IFNAME": "ib0", "LOCAL_ADDR": "10.9.9.1", "NODE_LOST_TIMEOUT_S": "30"}
    proc = run("docker_run.sh", ["--config", "c.yaml"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    words = calls(log, "docker")[0].split()
    assert "GLOO_SOCKET_IFNAME=ib0" in words and "NCCL_SOCKET_IFNAME=ib0" in words
    assert "--local-addr=10.9.9.1" in words and "--rdzv-conf=join_timeout=600,is_host=true" in words
    assert "--rejoin-timeout=30" in words


def test_docker_run_missing_data_dir(fakes, tmp_path):
    env, log, _ = fakes
    proc = run("docker_run.sh", ["--config", "c.yaml"], {**env, "DATA_DIR": str(tmp_path / "nope")}, cwd=tmp_path)
    assert proc.returncode != 0 and "DATA_DIR" in proc.stderr and not calls(log, "docker")
