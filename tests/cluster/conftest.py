"""Fixtures of the cluster tier: the namespace nodes and the one-machine run every multi-node result must equal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helpers beside this file (pytest runs in importlib mode)
from nodes import BASE_ENV, REPO, RUN, STEPS, checksums, two_nodes


@pytest.fixture(scope="session")
def one_machine(tmp_path_factory) -> str:
    """The final parameter checksum of RUN with both ranks on this machine (launch/single_node.sh, NPROC=2)."""
    out = tmp_path_factory.mktemp("one_machine")
    proc = subprocess.run(["bash", str(REPO / "launch/single_node.sh"), *RUN, f"output_dir={out}"], cwd=REPO,
                          env={**BASE_ENV, "NPROC": "2"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sums = checksums(proc.stdout + proc.stderr)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1] and sums[0][0] == STEPS, sums
    return sums[0][1]


@pytest.fixture
def pair(tmp_path):
    """Two fresh namespace nodes for one test, removed after it."""
    with two_nodes(tmp_path) as made:
        yield made
