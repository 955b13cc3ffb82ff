"""The GPU acceptance run: every CUDA path checked and measured on one device, with one verdict and a report.

    bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--beton FILE]      (python -m benchmarks.gpu_check ...)

Checks, each under its own time limit so that the verdict comes within 8 minutes on one GPU:
  a  the CUDA-marked tests (pytest -m cuda)
  b  every step mode (direct, cached, checkpoint) x amp bf16/fp16 x compile off/on: a few steps on one fixed
     batch give finite, falling losses (compile with step_mode=checkpoint: a refusal by the config that names
     both keys is the expected outcome)
  c  resume equals an uninterrupted run (python -m trainer.main twice with max_steps, then once straight)
  d  trainer.plan's peak for one direct step within 15% of torch.cuda.max_memory_allocated
  e  host syncs per step (torch.cuda.set_sync_debug_mode("warn")): loader, device augmentation, bf16 direct step
     with global BN on a 1-rank group, the loop's on-device loss sums; goal 0
  f  views/s and MFU of ResNet-50 at 224 px, bf16, channels_last: direct at 256 images (512 views) per device,
     cached at 1024 images (2048 views, the 8-GPU batch-8192 recipe's per-device batch)
  g  end to end: synthetic uint8 images -> the memory loader's crops -> device augmentation -> direct step
     (and FFCV with --beton), views/s; the device augmentation alone, views/s
  h  GlobalBatchNorm vs nn.SyncBatchNorm, steps/s and host syncs (a 1-rank group: both normalize locally there)
Writes report.json and summary.md to benchmarks/results/<gpu>-<date>/ (format: benchmarks/README.md) and exits
1 unless every check passed. --dry-run runs the same code on the CPU at tiny sizes (a is skipped; CUDA-only
measurements are reported as null): it checks the script, not the GPU.

This module runs the checks within their budgets and writes the verdict and report; the checks live in
benchmarks/gpu_checks_correctness.py (a-c), gpu_checks_memory.py (d, e) and gpu_checks_speed.py (f-h), what they
build on the device in gpu_checks_setup.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import environment, init_one_process
from benchmarks.gpu_checks_correctness import check_a_cuda_tests, check_b_step_modes, check_c_resume
from benchmarks.gpu_checks_memory import GOAL_PLAN_TOLERANCE, check_d_memory_plan, check_e_host_syncs
from benchmarks.gpu_checks_setup import REPO, SIZES, free_memory
from benchmarks.gpu_checks_speed import (
    GOAL_AUGMENT_OVER_STEP,
    GOAL_END_TO_END_VIEWS_PER_S,
    check_f_throughput,
    check_g_end_to_end,
    check_h_global_bn,
)

TOTAL_BUDGET_S = 455  # the verdict within 8 minutes (gpu.sh stops at 480 s): start-up and the report fit in the rest
DRY_RUN_BUDGET_FACTOR = 2.5  # a shared CPU is slow: the dry run's limits are looser (it checks code, not speed)
BUDGET_S = {"a_cuda_tests": 70, "b_step_modes": 150, "c_resume": 75, "d_memory_plan": 25, "e_host_syncs": 20,
            "f_throughput_mfu": 55, "g_end_to_end": 35, "h_global_bn_vs_sync_bn": 25}


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises CheckTimeout in the main thread once `seconds` have passed (between Python bytecodes: a CUDA call
    returns first). An alarm already set (a caller's own limit) is re-armed afterwards with the time it had left."""
    def expire(signum, frame):
        raise CheckTimeout(f"time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    outer_left, outer_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001), outer_interval)


# ============================================================================= run, verdict, report
def run(dry: bool, beton: str | None = None, budget_s: float = TOTAL_BUDGET_S) -> dict:
    s = SIZES["dry" if dry else "gpu"]
    factor = DRY_RUN_BUDGET_FACTOR if dry else 1.0
    budget_s *= factor
    start = time.monotonic()
    if not dry and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_check: no CUDA device (use --dry-run to check the script on the CPU)")
    ctx = init_one_process("cpu" if dry else "cuda")
    checks: dict = {}
    step_rate = {}

    def record(name: str, fn) -> None:
        remaining = budget_s - (time.monotonic() - start)
        limit = min(BUDGET_S[name] * factor, remaining)
        if limit < 5:
            checks[name] = {"status": "fail", "error": "not run: the 8-minute budget was spent"}
            return
        began = time.monotonic()
        print(f"gpu_check {name} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
        try:
            with time_limit(limit):
                checks[name] = fn(limit)
        except Exception as err:  # noqa: BLE001 - a failed check is reported, the others still run
            checks[name] = {"status": "fail", "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-3000:]}
            free_memory(ctx.device)
        checks[name]["seconds"] = time.monotonic() - began
        print(f"gpu_check {name}: {checks[name]['status']} ({checks[name]['seconds']:.0f} s)", file=sys.stderr,
              flush=True)

    try:
        record("a_cuda_tests", lambda lim: check_a_cuda_tests(s, ctx, lim, dry))
        record("e_host_syncs", lambda lim: check_e_host_syncs(s, ctx, lim, dry))
        record("d_memory_plan", lambda lim: check_d_memory_plan(s, ctx, lim, dry))
        record("f_throughput_mfu", lambda lim: check_f_throughput(s, ctx, lim, dry))
        direct = next((r for r in checks["f_throughput_mfu"].get("runs", []) if r["step_mode"] == "direct"), None)
        step_rate["direct"] = direct["views_per_s"] if direct else None
        record("g_end_to_end", lambda lim: check_g_end_to_end(s, ctx, lim, dry, beton, step_rate["direct"]))
        record("h_global_bn_vs_sync_bn", lambda lim: check_h_global_bn(s, ctx, lim, dry))
        record("b_step_modes", lambda lim: check_b_step_modes(s, ctx, lim, dry))
        record("c_resume", lambda lim: check_c_resume(s, ctx, lim, dry))
    finally:
        from trainer import distributed
        distributed.shutdown()
    checks = dict(sorted(checks.items()))
    verdict = "fail" if any(c["status"] == "fail" for c in checks.values()) else "pass"
    env = environment()
    return {"verdict": verdict, "dry_run": dry, "device": env.get("gpu") or f"cpu {env['cpu_model']}",
            "elapsed_s": time.monotonic() - start, "budget_s": budget_s, "environment": env,
            "sizes": s, "goals": {"end_to_end_views_per_s_h200": GOAL_END_TO_END_VIEWS_PER_S,
                                  "augment_over_step": GOAL_AUGMENT_OVER_STEP,
                                  "plan_tolerance": GOAL_PLAN_TOLERANCE, "host_syncs_per_step": 0},
            "checks": checks}


def _fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _gib(value) -> float | None:
    return value / 2 ** 30 if value else None


# each check's key numbers in the summary table, from its report entry
_KEY_NUMBERS = {
    "a_cuda_tests": lambda r: r.get("summary") or r.get("note", ""),
    "b_step_modes": lambda r: f"{sum(x.get('ok', False) for x in r.get('runs', []))}/{len(r.get('runs', []))} "
                              "combinations as expected",
    "c_resume": lambda r: f"bitwise equal: {r.get('bitwise_equal')}, "
                          f"max |diff| {_fmt(r.get('max_abs_difference'), '.3g')}",
    "d_memory_plan": lambda r: f"planned {_fmt((r.get('planned_peak_bytes') or 0) / 2**30, '.2f')} GiB, measured "
                               f"{_fmt(_gib(r.get('measured_peak_bytes')), '.2f')} GiB",
    "e_host_syncs": lambda r: f"{_fmt(r.get('host_syncs_per_step'), '.2f')} host syncs per step",
    "f_throughput_mfu": lambda r: "; ".join(f"{x['step_mode']} {x['views_per_device']} views: "
                                            f"{x['views_per_s']:.0f} views/s, MFU {_fmt(x['mfu'], '.1%')}"
                                            for x in r.get("runs", [])),
    "g_end_to_end": lambda r: f"end to end {_fmt(r.get('synthetic_views_per_s'))} views/s (FFCV "
                              f"{_fmt(r.get('ffcv_views_per_s'))}), augmentation "
                              f"{_fmt(r.get('augment_views_per_s'))} views/s = "
                              f"{_fmt(r.get('augment_over_step'), '.1f')}x the step",
    "h_global_bn_vs_sync_bn": lambda r: ", ".join(f"{k} {v:.0f} views/s"
                                                  for k, v in r.get("views_per_s", {}).items()),
}


def summary(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU acceptance: **{report['verdict'].upper()}**"
             + (" (dry run on the CPU)" if report["dry_run"] else ""),
             "", f"{report['device']}; torch {env['torch']}, CUDA {env['cuda']}, commit {env['commit']}, "
             f"{env['time_utc']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget", "",
             "| check | status | key numbers |", "|---|---|---|"]
    for name, r in report["checks"].items():
        try:
            text = r["error"] if "error" in r else _KEY_NUMBERS[name](r)
        except Exception as err:  # noqa: BLE001 - the summary never hides the report
            text = f"(see report.json: {err})"
        lines.append(f"| {name} | {r['status']} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument("--out", help="report folder (default benchmarks/results/<gpu>-<date>[-dry-run])")
    parser.add_argument("--beton", help="an FFCV .beton of images for check g's FFCV loader")
    args = parser.parse_args(argv)
    report = run(args.dry_run, args.beton)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{report['device']}-{time.strftime('%Y%m%d')}") + \
        ("-dry-run" if args.dry_run else "")
    folder = Path(args.out or REPO / "benchmarks" / "results" / tag)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (folder / "summary.md").write_text(summary(report))
    print(summary(report))
    print(f"wrote {folder}; verdict: {report['verdict']}", file=sys.stderr)
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
