"""The GPU acceptance script: its dry run on the CPU end to end (report files and fields, verdict pass), the
verdict logic, the time limit, and the FLOP count that MFU rests on."""
import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_checks_setup, gpu_checks_speed

REPO = Path(__file__).parents[2]
CHECKS = {"a_cuda_tests", "b_step_modes", "c_resume", "d_memory_plan", "e_host_syncs", "f_throughput_mfu",
          "g_end_to_end", "h_global_bn_vs_sync_bn"}


@pytest.mark.slow
def test_dry_run_writes_a_passing_report(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "pass" and report["dry_run"] is True
    for key in ("machine", "cpu_model", "torch", "cuda", "commit", "time_utc"):
        assert key in report["environment"]
    assert report["goals"] == {"end_to_end_views_per_s_h200": 4800, "augment_over_step": 10.0,
                               "plan_tolerance": 0.15, "host_syncs_per_step": 0}
    checks = report["checks"]
    assert set(checks) == CHECKS
    assert all(c["status"] in ("pass", "skipped") and c["seconds"] >= 0 and c["goal"] for c in checks.values())
    assert checks["a_cuda_tests"]["status"] == "skipped" and "dry run" in checks["a_cuda_tests"]["note"]
    runs = checks["b_step_modes"]["runs"]
    assert len(runs) == 12 and all(r["ok"] for r in runs)
    ran = [r for r in runs if r["outcome"] == "ran"]
    assert {(r["step_mode"], r["amp"], r["compile"]) for r in ran} >= {("direct", "fp16", True),
                                                                       ("cached", "bf16", True)}
    assert all(r["losses"][-1] < r["losses"][0] for r in ran)
    assert {r["step_mode"] for r in runs if r["outcome"] != "ran"} <= {"checkpoint"}
    assert checks["c_resume"]["bitwise_equal"] is True  # the CPU is deterministic: the resumed run is exact
    assert checks["d_memory_plan"]["planned_peak_bytes"] > 0 and checks["d_memory_plan"]["measured_peak_bytes"] is None
    assert checks["e_host_syncs"]["global_bn_layers"] > 0  # global BN really ran on the 1-rank group
    f = checks["f_throughput_mfu"]
    assert [r["step_mode"] for r in f["runs"]] == ["direct", "cached"] and all(r["views_per_s"] > 0 for r in f["runs"])
    assert f["runs"][1]["views_per_device"] == 2 * gpu_checks_setup.SIZES["dry"]["cached_batch"]
    g = checks["g_end_to_end"]
    assert g["synthetic_views_per_s"] > 0 and g["augment_views_per_s"] > 0
    assert g["augment_over_step"] == pytest.approx(g["augment_views_per_s"] / f["runs"][0]["views_per_s"])
    assert set(checks["h_global_bn_vs_sync_bn"]["views_per_s"]) == {"global"}  # SyncBatchNorm: no CPU kernel
    summary = (tmp_path / "summary.md").read_text()
    assert "**PASS**" in summary and all(name in summary for name in CHECKS)


def test_a_failing_check_fails_the_verdict_and_the_exit_code(monkeypatch, tmp_path):
    def passing(*args, **kwargs):
        return {"status": "pass", "goal": "-"}

    def broken(*args, **kwargs):
        raise RuntimeError("loss is nan")

    for name in ("a_cuda_tests", "b_step_modes", "c_resume", "d_memory_plan", "e_host_syncs", "g_end_to_end",
                 "h_global_bn"):
        monkeypatch.setattr(gpu_check, f"check_{name}", passing)
    monkeypatch.setattr(gpu_check, "check_f_throughput", broken)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "fail"
    assert report["checks"]["f_throughput_mfu"]["error"] == "RuntimeError: loss is nan"
    assert report["checks"]["g_end_to_end"]["status"] == "pass"  # the other checks still ran
    assert "**FAIL**" in (tmp_path / "summary.md").read_text()


def test_spent_budget_fails_the_checks_left():
    report = gpu_check.run(dry=True, budget_s=1.0)  # below the 5 s a check needs to start
    assert report["verdict"] == "fail" and set(report["checks"]) == CHECKS
    assert all(c["error"] == "not run: the 8-minute budget was spent" for c in report["checks"].values())


def test_time_limit_interrupts():
    start = time.monotonic()
    with pytest.raises(gpu_check.CheckTimeout, match="time limit of 0 s"):
        with gpu_check.time_limit(0.2):
            while True:
                time.sleep(0.01)
    assert time.monotonic() - start < 2


def test_time_limit_rearms_an_outer_alarm_with_the_time_it_had_left():
    """The suite's per-test timeout is such an alarm: a check's own limit must not cancel it."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    try:
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with gpu_check.time_limit(0.2), contextlib.suppress(gpu_check.CheckTimeout):
            time.sleep(1)
        assert fired == [] and 0.25 < signal.getitimer(signal.ITIMER_REAL)[0] < 0.45
        time.sleep(1)
        assert len(fired) == 1 and 0.55 < fired[0] - start < 0.8
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_resnet50_flops_match_torchvisions_published_count():
    # torchvision lists 4.09 GMACs for a ResNet-50 forward at 224 px; training = 3 x forward, 2 FLOPs per MAC
    assert gpu_checks_speed.flops_per_view("resnet50", 224) == pytest.approx(3 * 2 * 4.09e9, rel=0.03)


def test_peak_flops_from_the_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_checks_speed.peak_flops(torch.device("cuda", 0)) == ("H200", 989e12)
    assert gpu_checks_speed.peak_flops(torch.device("cpu")) == (None, None)
