"""What every benchmark report records: machine, versions, commit, config; and an interleaved timer."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Callable

import torch


def environment() -> dict:
    """Machine, versions and commit, so a number can be traced to where it was measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {"machine": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
