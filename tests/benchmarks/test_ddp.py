"""The DDP settings benchmark on 2 gloo ranks at its tiniest: every case runs, the report holds the ratios."""
import pytest
import torch

from benchmarks import ddp


@pytest.mark.slow
def test_two_gloo_ranks_report_every_setting_against_defaults():
    report = ddp.run("cpu", ranks=2, model="resnet18", image_size=16, batch=4, rounds=1)
    assert report["config"] == {"device": "cpu", "ranks": 2, "backend": "gloo", "model": "resnet18",
                                "image_size": 16, "per_rank_batch": 4, "rounds": 1, "amp": "off"}
    results = report["results"]
    assert set(results["steps_per_s"]) == set(results["speed_over_defaults"]) == set(ddp.VARIANTS)
    # relative to DDP's defaults: the defaults' own ratio is exactly 1, and the ratios rank the settings as their
    # rates do (a ratio taken the other way round, or against another case, breaks one of the two)
    assert results["speed_over_defaults"]["ddp_defaults"] == 1.0
    by_rate = sorted(ddp.VARIANTS, key=results["steps_per_s"].get)
    assert sorted(ddp.VARIANTS, key=results["speed_over_defaults"].get) == by_rate
    assert all(v is None for v in results["peak_step_bytes"].values())  # memory only on CUDA
    assert "memory_over_defaults" not in results
    assert report["environment"]["torch"] == torch.__version__


def test_one_named_device_is_one_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="cuda:1 names one device"):
        ddp.run("cuda:1", ranks=2)  # refused before any process starts
