"""The benchmark runner on its tiniest sizes: the report's schema and files (speeds are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]


@pytest.mark.slow  # five benchmarks in a subprocess: about 2 minutes on 2 busy cores
def test_tiny_run_writes_report_csv_plots_and_summary(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cpu", "--tiny", "--out", str(tmp_path),
                           "--only", "step,loss,optimizer,large_batch,end_to_end"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    env = report["environment"]
    for key in ("machine", "cpu_count", "torch", "cuda", "commit", "time_utc"):
        assert key in env
    results = report["results"]
    assert set(results) == {"step", "loss", "optimizer", "large_batch", "end_to_end"}
    step = results["step"]
    assert {"default", "amp_off"} <= {v["variant"] for v in step["variants"]}
    assert all(v["overhead_ratio"] > 0 for v in step["variants"])
    assert all(s["fits"] and s["img_per_s"] > 0 for s in step["batch_sweep"])
    row = next(r for r in results["loss"]["results"] if r["world_size"] == 8)
    assert row["logit_slice_bytes"] == row["slice_shape"][0] * row["slice_shape"][1] * 4
    assert row["full_peak_bytes"] > row["slice_peak_bytes"] > 0
    assert results["optimizer"]["results"]["lars_over_sgd"] > 0
    assert results["large_batch"]["results"]["memory_ratio_cached_over_direct"] >= 0
    assert 0 <= results["end_to_end"]["data_wait_frac"] <= 1
    assert (tmp_path / "summary.csv").read_text().startswith("benchmark,metric,value")
    assert "full step / bare forward+backward" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "step_batch_sweep.png").stat().st_size > 1000
    assert (tmp_path / "loss_memory.png").stat().st_size > 1000
