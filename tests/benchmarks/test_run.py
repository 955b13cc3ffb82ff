"""The benchmark runner on its tiniest sizes: the report's schema and files, the sizes each benchmark was given,
the numbers that do not depend on speed, and the CSV and summary reading the report's own values."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision
import yaml

REPO = Path(__file__).parents[2]


def numeric_leaves(tree, prefix=""):
    """Every number in a JSON tree with its dotted path (lists by index), written here independently of the
    runner's own flattening."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in numeric_leaves(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in numeric_leaves(value, f"{prefix}{i}.").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix[:-1]: tree}
    return {}


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

    # step: the tiny sizes, the CPU's variants (no channels_last or compile cases there), the fastest batch named
    step = results["step"]
    assert (step["model"], step["image_size"]) == ("resnet18", 16)
    assert [(v["variant"], v["per_device_batch"]) for v in step["variants"]] == [("default", 4), ("amp_off", 4)]
    assert [(s["per_device_batch"], s["fits"]) for s in step["batch_sweep"]] == [(2, True), (4, True)]
    fastest = max(step["batch_sweep"], key=lambda s: s["img_per_s"])
    assert step["fastest_fitting_batch"] == fastest["per_device_batch"]

    # loss: global batch 256 = 512 views; on 8 ranks each holds 64 rows against the 512 columns, fp32
    rows = {r["world_size"]: r for r in results["loss"]["results"]}
    assert sorted(rows) == [1, 2, 8] and all(r["global_batch"] == 256 for r in rows.values())
    assert rows[8]["slice_shape"] == [64, 512] and rows[8]["logit_slice_bytes"] == 64 * 512 * 4
    assert len({r["full_peak_bytes"] for r in rows.values()}) == 1  # the full matrix does not shrink with ranks
    assert rows[1]["slice_peak_bytes"] > rows[2]["slice_peak_bytes"] > rows[8]["slice_peak_bytes"]
    assert rows[8]["full_peak_bytes"] > rows[8]["slice_peak_bytes"] >= rows[8]["logit_slice_bytes"]

    # optimizer: ResNet-18's parameters without fc, plus the default 512-512-128 projection head
    backbone = sum(p.numel() for n, p in torchvision.models.resnet18().named_parameters() if not n.startswith("fc."))
    head = 512 * 512 + 2 * 512 + 512 * 128 + 128  # hidden linear (no bias), its BN, output linear
    assert results["optimizer"]["config"]["parameters"] == backbone + head
    assert set(results["optimizer"]["results"]["step_s"]) == {"lars_foreach", "sgd_momentum_foreach",
                                                              "lars_per_parameter_loop"}

    lb = results["large_batch"]
    assert {k: lb["config"][k] for k in ("image_size", "batch", "chunk")} == {"image_size": 16, "batch": 4, "chunk": 4}
    assert set(lb["results"]["peak_step_bytes"]) == {"direct", "cached"}

    # end to end: images/s over steps/s is the quickstart's global batch (both come from the trainer's own log)
    e2e = results["end_to_end"]
    batch = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())["batch_size"]
    assert e2e["steps"] == 8 and e2e["img_per_s"] / e2e["steps_per_s"] == pytest.approx(batch, rel=1e-4)

    with open(tmp_path / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["benchmark", "metric", "value"]
    assert {metric: float(value) for _, metric, value in table[1:]} == numeric_leaves(results)
    summary = (tmp_path / "summary.md").read_text()
    assert f"full step / bare forward+backward: **{step['variants'][0]['overhead_ratio']:.2f}**" in summary
    assert f"LARS / SGD step time: **{results['optimizer']['results']['lars_over_sgd']:.2f}**" in summary
    for name in ("step_batch_sweep.png", "loss_memory.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name
        assert f"![{name}]({name})" in summary
