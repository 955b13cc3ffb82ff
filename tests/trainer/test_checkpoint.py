"""Checkpoints: atomic keep-last-k, fallback past a torn file, weights_only loading, torchvision-loadable export."""
import os

import numpy as np
import pytest
import torch
import torchvision

from trainer import checkpoint
from trainer.config import ModelConfig
from trainer.export import export_backbone
from trainer.model import build_model


def _state(step):
    return {"model": {"backbone.w": torch.full((2,), float(step))}, "step": step}


def test_keeps_last_k_and_loads_newest(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(_state(step), tmp_path, step, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["ckpt_000000030.pt", "ckpt_000000040.pt"]
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 40 and path.name == names[-1]
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no temporary files left behind


def test_a_corrupt_newest_checkpoint_is_quarantined_not_kept_in_place_of_new_ones(tmp_path):
    """Fallback past a torn newest file; rank 0 renames it: with keep=1 it used to sort newest and have every
    new checkpoint pruned at once."""
    for step in (10, 20):
        checkpoint.save(_state(step), tmp_path, step, keep=2)
    torn = checkpoint.list_checkpoints(tmp_path)[-1]
    torn.write_bytes(torn.read_bytes()[:50])
    with pytest.warns(UserWarning, match="ckpt_000000020.pt is damaged"):
        state, path = checkpoint.load_latest(tmp_path)  # ranks other than 0: fall back, leave the file
    assert state["step"] == 10 and path.name == "ckpt_000000010.pt" and torn.exists()
    with pytest.warns(UserWarning, match="ckpt_000000020.pt"):
        state, _ = checkpoint.load_latest(tmp_path, quarantine=True)
    assert state["step"] == 10 and (tmp_path / "checkpoints" / "ckpt_000000020.pt.corrupt").exists()
    checkpoint.save(_state(11), tmp_path, 11, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_000000011.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["step"] == 11


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    checkpoint.save(_state(5), tmp_path, 5, keep=1)
    only = checkpoint.list_checkpoints(tmp_path)[0]
    only.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(checkpoint.ResumeError, match="damaged: ckpt_000000005.pt"):
        checkpoint.load_latest(tmp_path, quarantine=True)
    with pytest.raises(checkpoint.ResumeError, match="ckpt_000000005.pt.corrupt.*Move them away"):
        checkpoint.load_latest(tmp_path)  # the next attempt too, though the file is now quarantined
    assert checkpoint.load_latest(tmp_path / "fresh") == (None, None)


def test_save_removes_temporary_files_of_killed_writers(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".ckpt_000000003.pt.tmp4242").write_bytes(b"half a checkpoint")
    checkpoint.save(_state(4), tmp_path, 4, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt_000000004.pt"]


def test_a_full_disk_names_the_checkpoint_and_the_cause(tmp_path, monkeypatch):
    checkpoint.save(_state(1), tmp_path, 1, keep=2)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt_000000002\.pt failed .*No space left on device"):
        checkpoint.save(_state(2), tmp_path, 2, keep=2)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_000000001.pt"]


def test_failed_write_leaves_previous_file_intact(tmp_path):
    target = tmp_path / "x.pt"
    checkpoint.atomic_save({"a": torch.ones(1)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.atomic_save({"a": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["a"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


@pytest.mark.parametrize("base_model", ["resnet18", "resnet50"])
def test_export_loads_into_torchvision_resnet(tmp_path, base_model):
    model = build_model(ModelConfig(base_model=base_model, out_dim=16))
    checkpoint.save({"model": model.state_dict(), "step": 5}, tmp_path / "run", 5, keep=1)
    export_backbone(str(tmp_path / "run"), str(tmp_path / "backbone.pt"))
    weights = torch.load(tmp_path / "backbone.pt", weights_only=True)
    net = getattr(torchvision.models, base_model)()
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    torch.testing.assert_close(net.conv1.weight, model.backbone.conv1.weight)
    net.fc = torch.nn.Identity()
    net.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net(x), model.backbone(x))


def test_fine_tune_source_resolution(tmp_path):
    model = build_model(ModelConfig(out_dim=8))
    checkpoint.save({"model": model.state_dict(), "step": 1}, tmp_path, 1, keep=1)
    weights = checkpoint.load_backbone_weights(str(tmp_path))
    assert set(weights) == set(model.backbone.state_dict())
    with pytest.raises(FileNotFoundError, match="fine_tune_from=nope"):
        checkpoint.load_backbone_weights("nope")


def test_one_run_at_a_time_per_output_dir(tmp_path):
    """The lock is per process (POSIX): a second process waits up to wait_s, then names the holder."""
    import subprocess
    import sys

    held = checkpoint.hold_output_dir(tmp_path / "run")
    code = ("import sys; from trainer import checkpoint\n"
            "try:\n    checkpoint.hold_output_dir(sys.argv[1], wait_s=1.0)\n"
            "except checkpoint.ResumeError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120).stdout
    assert f"run is in use by another run (pid {os.getpid()} on " in out and "delete" in out
    held.close()  # as when the process ends, whatever ends it
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120).stdout
    assert out == ""


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.warns(UserWarning, match="cannot be locked"):
        checkpoint.hold_output_dir(tmp_path).close()


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "zeros":
        path.write_bytes(bytes(5000))
    elif how == "cut at 20 KB":
        path.write_bytes(bytes(data[:20_000]))
    elif how == "a byte of data.pkl changed":
        at = data.index(b"data.pkl") + 200  # inside the pickle, past its local header
        data[at] ^= 0x55
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["random bytes", "zeros", "cut at 20 KB", "a byte of data.pkl changed"])
def test_damage_of_every_kind_falls_back_to_the_previous_checkpoint(tmp_path, how):
    """torch reports these as EOFError, OSError, UnpicklingError or RuntimeError; all are damage."""
    big = {"model": {"w": torch.arange(50_000, dtype=torch.float32)}, "step": 0, "note": "x" * 3000}
    for step in (1, 2):
        checkpoint.save({**big, "step": step}, tmp_path, step, keep=2)
    _damage(checkpoint.list_checkpoints(tmp_path)[-1], how)
    with pytest.warns(UserWarning, match="ckpt_000000002.pt is damaged"):
        state, path = checkpoint.load_latest(tmp_path, quarantine=True)
    assert state["step"] == 1 and (tmp_path / "checkpoints" / "ckpt_000000002.pt.corrupt").exists()


def test_a_type_this_torch_refuses_is_not_damage(tmp_path):
    from fractions import Fraction

    checkpoint.save(_state(1), tmp_path, 1, keep=2)
    checkpoint.save({**_state(2), "ratio": Fraction(1, 3)}, tmp_path, 2, keep=2)
    with pytest.raises(checkpoint.ResumeError, match=r"ckpt_000000002\.pt could not be read .*Weights only"):
        checkpoint.load_latest(tmp_path, quarantine=True)
    assert (tmp_path / "checkpoints" / "ckpt_000000002.pt").exists()


def test_a_good_checkpoint_that_fails_to_load_stays_and_stops_the_run(tmp_path, monkeypatch):
    """An I/O error (or memory, or a type a newer torch refuses) is not damage: no fallback to an older
    checkpoint, no quarantine; the run stops naming the file and the cause."""
    for step in (1, 2):
        checkpoint.save(_state(step), tmp_path, step, keep=3)

    def io_error(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "load", io_error)
    with pytest.raises(checkpoint.ResumeError, match=r"ckpt_000000002\.pt could not be read .*Input/output error"):
        checkpoint.load_latest(tmp_path, quarantine=True)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_000000001.pt", "ckpt_000000002.pt"]


def _resume_on_rank(rank, world_size, folders):
    """The resume choice where each rank sees its own folder: every rank must raise, none may wait."""
    from trainer.distributed import DistContext

    ctx = DistContext(rank, rank, world_size, torch.device("cpu"), "gloo")
    try:
        checkpoint.load_resume_state(folders[rank], ctx)
    except checkpoint.ResumeError as err:
        return str(err)
    return "resumed"


def test_ranks_that_cannot_agree_on_a_checkpoint_all_stop_naming_why(tmp_path, distributed_run):
    good, damaged, older = (tmp_path / n for n in ("good", "damaged", "older"))
    checkpoint.save(_state(4), good, 4, keep=1)
    checkpoint.save(_state(2), older, 2, keep=1)
    checkpoint.save(_state(4), damaged, 4, keep=1)
    checkpoint.list_checkpoints(damaged)[0].write_bytes(b"")
    only_rank_1_fails = distributed_run(_resume_on_rank, 2, [str(good), str(damaged)])
    assert all("rank 1: no readable checkpoint" in m and "rank 0" not in m for m in only_rank_1_fails)
    different_steps = distributed_run(_resume_on_rank, 2, [str(good), str(older)])
    assert all("rank 0: step 4" in m and "rank 1: step 2" in m for m in different_steps)
    assert distributed_run(_resume_on_rank, 2, [str(good), str(good)]) == ["resumed", "resumed"]
