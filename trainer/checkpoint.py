"""Checkpoints: atomic writes, keep-last-k, resume from the newest readable one, backbone export and fine-tune loading."""
from __future__ import annotations

import os
import re
import socket
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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written."""


class ResumeError(CheckpointError):
    """A run that cannot start from its output_dir: held by another run, or no checkpoint there loads."""


def _causes(err: BaseException) -> str:
    """The messages of an exception and of the exceptions behind it (torch hides 'No space left' one level down)."""
    seen, parts = set(), []
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {err}".strip())
        err = err.__cause__ or err.__context__
    return " <- ".join(parts)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: never a torn file at `path`.
    A failed write (disk full, say) raises CheckpointError naming `path` and the cause."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"writing {path} failed ({_causes(err)}); the files already there are intact") from err
    finally:
        if tmp.exists():
            tmp.unlink()


def hold_output_dir(output_dir: str | os.PathLike):
    """An exclusive lock on <output_dir>/.lock for as long as the returned file stays open (rank 0 holds it for
    the run). The operating system releases it when the process ends, however it ends, so a restarted job
    takes it over; a second job started on the same folder stops here instead of mixing checkpoints."""
    import fcntl

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ResumeError(f"output_dir {folder} is in use by another run ({holder}): wait for it to end, "
                              "or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def save(state: dict, output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Writes ckpt_<step>.pt atomically, then deletes the older checkpoints beyond the newest `keep`, and the
    temporary files of writes that a killed process left behind."""
    path = checkpoint_dir(output_dir) / f"ckpt_{step:09d}.pt"
    atomic_save(state, path)
    older = [p for p in list_checkpoints(output_dir) if _step(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)
    for stray in path.parent.glob(".ckpt_*.pt.tmp*"):
        if stray.name != f".{path.name}.tmp{os.getpid()}":
            stray.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(output_dir: str | os.PathLike, map_location="cpu", quarantine: bool = False
                ) -> tuple[dict | None, Path | None]:
    """The newest checkpoint that loads; (None, None) for a run without checkpoints.

    An unreadable one (torn, corrupt) is skipped with a warning naming it; with `quarantine` (rank 0) it is
    renamed to <name>.corrupt so that it can neither shadow nor displace the checkpoints written after it.
    A run whose checkpoints (.corrupt ones included) all fail to load raises ResumeError instead of
    silently starting again from step 0: move them away, or choose another output_dir, to start afresh."""
    unreadable = sorted(checkpoint_dir(output_dir).glob("ckpt_*.pt.corrupt"))
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state = load(path, map_location)
            if not isinstance(state, dict) or "model" not in state or "step" not in state:
                raise ValueError("missing model/step entries")
            return state, path
        except Exception as err:  # noqa: BLE001 - any unreadable file means: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); trying the previous one",
                          stacklevel=2)
            unreadable.append(path)
            if quarantine:
                try:
                    path.rename(path.with_name(path.name + ".corrupt"))
                except OSError:  # another process renamed it first
                    pass
    if unreadable:
        raise ResumeError(f"no readable checkpoint in {checkpoint_dir(output_dir)}; unreadable: "
                              f"{', '.join(p.name for p in unreadable)}. Move them away (or choose another "
                              "output_dir) to start from step 0")
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
        where = "" if Path(source).is_absolute() else f" or {Path('runs') / source}"
        raise FileNotFoundError(f"fine_tune_from={source}: no checkpoint file or run directory there{where}")
    state = load(path, map_location)
    if "model" in state and isinstance(state["model"], dict):
        return backbone_state(state["model"])
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
