"""docker_run.sh against a fake docker: the container's mounts, user and environment, and the torchrun inside."""
import os

from tests.launch.launchers import calls, run


def test_docker_run_command(fakes, tmp_path):
    env, log, _ = fakes
    data, out = tmp_path / "mnt-data", tmp_path / "out"
    data.mkdir()
    env = {**env, "SIMCLR_DATA": str(data), "OUTPUT_DIR": str(out), "NCCL_DEBUG": "INFO", "TORCH_HOME": "/host"}
    proc = run("docker_run.sh", ["--config", "configs/stl10_r18.yaml", "epochs=1"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [line] = calls(log, "docker")
    words = line.split()
    for part in ("--rm", "--ipc=host", "--init", "memlock=-1", "stack=67108864", "simclr-trainer:latest",
                 f"{out}:/workspace/runs", "NCCL_DEBUG", "--standalone", "--nproc_per_node=gpu",
                 f"{os.getuid()}:{os.getgid()}"):
        assert part in words, part
    assert words[words.index("--gpus") + 1] == "all"
    # the configs' datasets/<name>/... paths, relative to the container's working directory, reach the host's folder
    assert [w for w in words if w.endswith(":/workspace/datasets:ro")] == [f"{data}:/workspace/datasets:ro"]
    assert "TORCH_HOME" not in words and "--network=host" not in words
    assert line.endswith("python -m trainer.distributed --standalone --max-restarts=0 "
                         "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=120 "
                         "--nproc_per_node=gpu -m trainer.main --config configs/stl10_r18.yaml epochs=1")
    assert out.is_dir()


def test_docker_run_mounts_datasets_of_the_working_directory(fakes, tmp_path):
    env, log, _ = fakes
    env = {**env, "OUTPUT_DIR": str(tmp_path / "out")}
    assert run("docker_run.sh", ["--config", "c.yaml"], env, cwd=tmp_path).returncode == 0  # no ./datasets
    (tmp_path / "datasets").mkdir()
    assert run("docker_run.sh", ["--config", "c.yaml"], env, cwd=tmp_path).returncode == 0
    without, with_folder = ([w for w in line.split() if "/workspace/datasets" in w] for line in calls(log, "docker"))
    assert without == [] and with_folder == [f"{tmp_path}/datasets:/workspace/datasets:ro"]


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


def test_docker_run_missing_data_folder(fakes, tmp_path):
    env, log, _ = fakes
    proc = run("docker_run.sh", ["--config", "c.yaml"], {**env, "SIMCLR_DATA": str(tmp_path / "nope")}, cwd=tmp_path)
    assert proc.returncode != 0 and f"SIMCLR_DATA={tmp_path / 'nope'}" in proc.stderr and not calls(log, "docker")
