"""Every benchmark's --device: one parser (auto, cpu, cuda, cuda:N), and the device each benchmark then runs on."""
import argparse
import importlib

import pytest
import torch

from benchmarks import common

BENCHMARKS = ["run", "step", "large_batch", "loader", "loss", "optimizer", "augment", "ddp", "global_bn"]


@pytest.fixture
def two_gpus(monkeypatch):
    """This machine seen as one with two CUDA devices (parsing and device choice only: nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test device")  # the report's name


def test_resolve_device_forms(two_gpus):
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device("cuda") == torch.device("cuda", 0)
    assert common.resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)  # cuda: this rank's device
    assert common.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert common.resolve_device("CUDA:1") == torch.device("cuda", 1)  # cuda:N: exactly N, whatever the rank
    with pytest.raises(ValueError, match="2 CUDA device"):
        common.resolve_device("cuda:2")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        common.resolve_device("gpu")


def test_cuda_refused_clearly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        common.resolve_device("cuda:0")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_parses_cuda_n(name, monkeypatch, capsys):
    """`--device cuda:0` is a device form every benchmark accepts: without CUDA the parser says CUDA is missing
    (before: benchmarks.large_batch and the others refused it as an invalid choice, so benchmarks.run --device
    cuda, which hands them cuda:0, broke)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--device", "cuda:0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "invalid choice" not in err


def test_large_batch_measures_on_the_device_given(two_gpus, monkeypatch):
    from benchmarks import large_batch

    seen = {}
    monkeypatch.setattr(large_batch, "measure", lambda *a: seen.setdefault("device", a[4]) and {})
    large_batch.main(["--device", "cuda:1"])
    assert seen["device"] == torch.device("cuda", 1)


def test_loader_augments_on_the_device_given(two_gpus, monkeypatch, tmp_path):
    """The device augmentation (d) runs on the device handed in; it used to fall back to the CPU for cuda:N."""
    import data.prepare
    from benchmarks import loader

    seen = []
    monkeypatch.setattr(loader, "make_photos", lambda folder, count: tmp_path)
    monkeypatch.setattr(data.prepare, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(loader, "measure", lambda root, beton, size, batch, workers, device, budget:
                        seen.append(device) or {})
    monkeypatch.setattr(loader, "workers_sweep", lambda *a: {})
    report = loader.run(quick=True, device="cuda:1")
    assert seen == [torch.device("cuda", 1)] * 2  # 96 px and 224 px
    assert report["config"]["device"] == "cuda:1"


def test_device_argument_normalizes_and_stops_at_parsing_naming_the_forms(capsys):
    parser = argparse.ArgumentParser()
    common.add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", " CPU "]).device == "cpu"  # as typed in a job script
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--device", "gpu"])
    assert exit_info.value.code == 2
    assert "--device 'gpu': use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    other = argparse.ArgumentParser()
    common.add_device_argument(other, default="cpu")  # benchmarks.ddp's default
    assert other.parse_args([]).device == "cpu"
