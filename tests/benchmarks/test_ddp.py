"""The DDP settings benchmark on 2 gloo ranks at its tiniest: every case runs, the report holds the ratios."""
import pytest
import torch

from benchmarks import ddp


@pytest.mark.slow
def test_two_gloo_ranks_report_every_setting_against_defaults():
    report = ddp.run("cpu", ranks=2, model="resnet18", image_size=16, batch=4, rounds=1)
    assert report["config"]["ranks"] == 2 and report["config"]["backend"] == "gloo"
    results = report["results"]
    assert set(results["steps_per_s"]) == set(ddp.VARIANTS)
    assert all(rate > 0 for rate in results["steps_per_s"].values())
    for name, ratio in results["speed_over_defaults"].items():
        assert ratio == pytest.approx(results["steps_per_s"][name] / results["steps_per_s"]["ddp_defaults"])
    assert all(v is None for v in results["peak_step_bytes"].values())  # memory only on CUDA
    assert report["environment"]["torch"] == torch.__version__


def test_one_named_device_is_one_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="cuda:1 names one device"):
        ddp.run("cuda:1", ranks=2)  # refused before any process starts
