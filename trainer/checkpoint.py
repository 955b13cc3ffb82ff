"""Checkpoints: atomic writes, keep-last-k, resume from the newest readable one, backbone export and fine-tune loading."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first (by step in the name)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: never a torn file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save(state: dict, output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Writes ckpt_<step>.pt atomically and deletes all but the newest `keep`."""
    path = checkpoint_dir(output_dir) / f"ckpt_{step:09d}.pt"
    atomic_save(state, path)
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(output_dir: str | os.PathLike, map_location="cpu") -> tuple[dict | None, Path | None]:
    """The newest checkpoint that loads; a torn or corrupt one is skipped with a warning naming it."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state = load(path, map_location)
            if not isinstance(state, dict) or "model" not in state or "step" not in state:
                raise ValueError("missing model/step entries")
            return state, path
        except Exception as err:  # noqa: BLE001 - any unreadable file means: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); trying the previous one",
                          stacklevel=2)
    return None, None


def backbone_state(model_state: dict) -> dict:
    """The backbone part of a SimCLRModel state_dict, keys as torchvision's ResNet names them (no fc)."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


def resolve_fine_tune(source: str) -> Path | None:
    """A checkpoint file, a run directory (its newest checkpoint) or the seed's run name under runs/."""
    for candidate in (Path(source), Path("runs") / source):
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            run = candidate.parent if candidate.name == CHECKPOINT_DIR else candidate
            found = list_checkpoints(run)
            if found:
                return found[-1]
            exported = sorted(candidate.glob("*.pt")) + sorted(candidate.glob("*.pth"))
            if exported:
                return exported[-1]
    return None


def load_backbone_weights(source: str, map_location="cpu") -> dict:
    """Backbone weights from a training checkpoint or an exported backbone state_dict."""
    path = resolve_fine_tune(source)
    if path is None:
        raise FileNotFoundError(f"fine_tune_from={source}: no checkpoint file, run directory or runs/{source}")
    state = load(path, map_location)
    if "model" in state and isinstance(state["model"], dict):
        return backbone_state(state["model"])
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
