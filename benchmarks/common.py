"""What every benchmark shares: the --device argument, the report's machine/versions/commit, an interleaved timer."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def device_arg(text: str) -> str:
    """argparse type of every benchmark's --device: auto | cpu | cuda | cuda:N, checked against this machine
    (so `--device cuda:3` on a 2-GPU node, or `cuda` without CUDA, stops at parsing with the reason)."""
    text = text.strip().lower()
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--device {text!r}: use {DEVICE_CHOICES}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"--device {text}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise argparse.ArgumentTypeError(f"--device {text}: this machine has {count} CUDA device(s), "
                                             f"cuda:0..cuda:{count - 1}")
    return text


def resolve_device(text: str, local_rank: int = 0) -> torch.device:
    """The device a benchmark runs on: `cuda` (and `auto` with CUDA) is this process's cuda:LOCAL_RANK,
    `cuda:N` exactly device N; errors as device_arg's (raised as ValueError)."""
    try:
        text = device_arg(text)
    except argparse.ArgumentTypeError as err:
        raise ValueError(str(err)) from None
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if text in ("auto", "cuda"):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(text)


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, type=device_arg,
                        help=f"{DEVICE_CHOICES} (cuda: this process's cuda:LOCAL_RANK; default {default})")


def init_one_process(device: str):
    """A process group of one on `device` (any of device_arg's forms), for the benchmarks that run the trainer's
    DDP code in a single process; returns the trainer's DistContext."""
    from trainer import distributed

    dev = resolve_device(device)
    # pick_device maps cuda to cuda:local_rank: passing the wanted index as local_rank selects cuda:N
    return distributed.init(distributed.WorldInfo(0, dev.index or 0, 1, 0), dev.type)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def environment() -> dict:
    """Machine, versions and commit, so a number can be traced to where it was measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {"machine": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a benchmark's own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rates(cases: dict[str, Callable[[], None]], items_per_call: int, device: torch.device,
                      warmup: int = 2, rounds: int = 5, calls_per_round: int = 3) -> dict[str, float]:
    """items/s of each case, measured in alternating rounds (so machine noise hits all cases alike); the
    median round of each case is reported."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(calls_per_round):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / calls_per_round)
    return {name: items_per_call / sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def emit(report: dict, path: str | None = None) -> None:
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


def run_trainer(cmd: list[str], threads: int, out: Path) -> tuple[list[dict], float]:
    """Runs a training command (`python -m trainer.main ...` or torchrun) from the checkout with OMP_NUM_THREADS
    = threads; returns the records of out/metrics.jsonl and the wall time in seconds (error: its output's tail)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], wall_s


def emit_with_summary(report: dict, out: str | None, name: str, summary_md: str) -> None:
    """The JSON report and its markdown summary: <out>/<name>.json and <out>/<name>.md (printed either way)."""
    folder = Path(out) if out else None
    emit(report, str(folder / f"{name}.json") if folder else None)
    if folder:
        (folder / f"{name}.md").write_text(summary_md)
    print(summary_md)
