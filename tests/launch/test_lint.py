"""The linters over the tree: shellcheck and bash -n on the launch scripts, hadolint on the Dockerfile, ruff (with
ruff.toml) on every Python file. The linters come with the test extra: bash launch/install.sh --test."""
import configparser
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.launchers import LAUNCH, REPO

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


# --- ruff ---------------------------------------------------------------------------------------------------

def ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """ruff with the project's ruff.toml, from the repository root, leaving no cache behind."""
    return subprocess.run([tool("ruff"), *args, "--no-cache", "--config", str(REPO / "ruff.toml")], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_ruff_is_the_pinned_release():
    """Another release checks differently: the version installed is the one setup.cfg's test extra pins."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    [pin] = [line for line in cfg["options.extras_require"]["test"].split() if line.startswith("ruff")]
    assert pin.startswith("ruff=="), f"pin ruff to one release in setup.cfg, not {pin!r}"
    version = subprocess.run([tool("ruff"), "--version"], capture_output=True, text=True).stdout.split()
    assert version == ["ruff", pin.removeprefix("ruff==")], "run bash launch/install.sh --test"


def test_ruff_checks_the_whole_python_tree():
    """Every Python file of the project's packages, tests and benchmarks; none of .venv or the benchmark results."""
    proc = ruff("check", "--show-files", ".")
    files = {Path(line).relative_to(REPO) for line in proc.stdout.splitlines() if line.endswith(".py")}
    project = {path.relative_to(REPO) for folder in ("trainer", "data", "tests", "benchmarks")
               for path in (REPO / folder).rglob("*.py")}
    project = {path for path in project if path.parts[:2] != ("benchmarks", "results")}
    assert Path("tests/launch/test_lint.py") in project and not project - files, sorted(project - files)
    assert not [f for f in files if f.parts[0] == ".venv" or f.parts[:2] == ("benchmarks", "results")]


def test_ruff_reports_the_rules_the_project_chose():
    """A file with one fault of each kind ruff.toml selects gets exactly those findings (an empty rule set would
    make the clean-tree test pass on anything)."""
    faulty = ("import sys\nimport os\n\n\n"  # os unused (F401), the block out of order (I001)
              "def f(items=[]):\n"  # a mutable default (B006)
              "    try:\n        return items + sys.argv\n"
              "    except Exception:\n"  # blind (BLE001)
              f"        return '{'x' * 120}'\n")  # over 120 characters (E501)
    proc = ruff("check", "--output-format=json", "--stdin-filename", "trainer/faulty.py", "-", stdin=faulty)
    assert sorted(finding["code"] for finding in json.loads(proc.stdout)) == ["B006", "BLE001", "E501", "F401",
                                                                             "I001"]
    assert proc.returncode == 1


def test_ruff_clean():
    proc = ruff("check", "--output-format=concise", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr
