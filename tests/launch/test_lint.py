"""Launch scripts and the Dockerfile: shellcheck, hadolint, bash -n, and the scripts' argument handling."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + [REPO / "launch" / "slurm.sbatch", REPO / ".ci" / "run",
                                                    REPO / "benchmarks" / "gpu.sh"]


def tool(name: str) -> str:
    """The linters come with the test extra: next to this Python, else on PATH; missing is a failure."""
    found = Path(sys.executable).parent / name
    path = str(found) if found.exists() else shutil.which(name)
    assert path, f"{name} is not installed: run bash launch/install.sh --test"
    return path


def test_shellcheck_clean():
    proc = subprocess.run([tool("shellcheck"), "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.fixture
def fake_torchrun(tmp_path):
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\necho "torchrun $*"\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}


def test_multi_node_names_missing_variable(fake_torchrun):
    env = {k: v for k, v in fake_torchrun.items() if k not in ("MASTER_ADDR", "NNODES")}
    proc = subprocess.run(["bash", "launch/multi_node.sh", "--config", "c.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr and "torchrun" not in proc.stdout


def test_multi_node_passes_rendezvous(fake_torchrun):
    env = {**fake_torchrun, "MASTER_ADDR": "10.0.0.1", "NNODES": "2", "NPROC": "4"}
    proc = subprocess.run(["bash", "launch/multi_node.sh", "--config", "c.yaml", "epochs=1"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for part in ("--nnodes=2", "--nproc_per_node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29500",
                 "--max-restarts=3", "-m trainer.main --config c.yaml epochs=1"):
        assert part in proc.stdout


def test_single_node_passes_arguments(fake_torchrun):
    proc = subprocess.run(["bash", "launch/single_node.sh", "--config", "X", "a=1"], cwd=REPO,
                          env={**fake_torchrun, "NPROC": "3"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--standalone --nproc_per_node=3 -m trainer.main --config X a=1" in proc.stdout
