"""Running the launch scripts against fake torchrun / srun / scontrol / docker / nvidia-smi executables that record
their arguments, so nothing real starts. The `fakes` fixture (conftest.py) builds them."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[2]
LAUNCH = REPO / "launch"

# Each fake appends one line to $FAKE_LOG: its name, then its arguments separated by spaces.
RECORDER = '#!/usr/bin/env bash\nprintf "%s\\n" "$(basename "$0") $*" >> "$FAKE_LOG"\n'


def make_fakes(tmp_path: Path) -> tuple[dict, Path, Path]:
    """A bin folder first on PATH with recording fakes; returns (env, log path, bin folder)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    log.touch()

    def add(name, body=""):
        path = bin_dir / name
        path.write_text(RECORDER + body)
        path.chmod(0o755)

    add("torchrun")
    add("docker")
    add("nvidia-smi", 'echo "GPU 0: Fake (UUID: GPU-0)"; echo "GPU 1: Fake (UUID: GPU-1)"\n')
    add("scontrol", '[ "$1 $2" = "show hostnames" ] && printf "node01\\nnode02\\n"\nexit 0\n')
    # srun: FAKE_SRUN=wait waits for USR1 and then exits 1, as plain torchrun does after forwarding a signal (the
    # agent: 128 + its number; the script only looks at USR1).
    add("srun", 'if [ "${FAKE_SRUN:-0}" = wait ]; then\n'
                '  trap \'echo "srun got USR1" >> "$FAKE_LOG"; exit 1\' USR1\n'
                '  for _ in $(seq 200); do sleep 0.1; done; exit 9\n'
                'fi\nexit "${FAKE_SRUN:-0}"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NPROC", "CUDA_VISIBLE", "NCCL_", "GPUS",
                                "MAX_RESTARTS", "SHUTDOWN_TIMEOUT_S", "SIMCLR_DATA", "OUTPUT_DIR"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), TORCHRUN=str(bin_dir / "torchrun"))
    return env, log, bin_dir


def run(script: str, args: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def calls(log: Path, program: str) -> list[str]:
    """The recorded command lines of one fake program, in order."""
    return [line for line in log.read_text().splitlines() if line.startswith(program + " ")]


def flag_values(line: str, flag: str) -> list[str]:
    """Every value of --flag=value in a recorded command line (a flag given twice shows up twice)."""
    return [word.split("=", 1)[1] for word in line.split() if word.startswith(flag + "=")]
