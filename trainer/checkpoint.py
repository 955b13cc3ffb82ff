"""Checkpoints: a run's state to and from a dict, atomic writes, keep-last-k, the newest readable one, the ranks'
agreement on which one to resume, the output_dir lock, backbone export and fine-tune loading."""
from __future__ import annotations

import os
import re
import socket
import time
import warnings
import zipfile
from pathlib import Path

import torch

from trainer.run_state import Progress, RunState

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first (by step in the name)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=_step)


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


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
        folder = os.open(path.parent, os.O_RDONLY)
        try:  # the rename itself reaches the disk (else a power loss can undo it on some file systems)
            os.fsync(folder)
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"writing {path} failed ({_causes(err)}); the files already there are intact") from err
    finally:
        if tmp.exists():
            tmp.unlink()


LOCK_WAIT_S = 20.0  # how long a new run waits for the lock (a killed job's workers may still be checkpointing)


def hold_output_dir(output_dir: str | os.PathLike, wait_s: float = LOCK_WAIT_S):
    """An exclusive lock on <output_dir>/.lock for as long as the returned file stays open (rank 0 holds it for
    the run), so a second job started on the same folder stops instead of mixing checkpoints with the first.

    A POSIX record lock (lockf): the operating system releases it when the process ends, however it ends, so
    a restarted job takes it over, and the processes it forks (loader workers) do not inherit it. Waits up to
    `wait_s` for a holder that is ending. A file system without locks (e.g. Lustre mounted noflock) gets a
    warning and no lock."""
    import fcntl

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")  # noqa: SIM115 - held open for the whole run: the lock lives with it
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except (BlockingIOError, PermissionError):  # held (EAGAIN / EACCES)
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise ResumeError(f"output_dir {folder} is in use by another run ({holder}): wait for it to end, "
                                  "or choose another output_dir (if that process is gone, e.g. its node died, "
                                  f"delete {folder / '.lock'})") from None
            time.sleep(0.5)
        except OSError as err:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locking on this file system
            warnings.warn(f"output_dir {folder} cannot be locked ({err}); nothing stops a second run from "
                          "writing there", stacklevel=2)
            return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def save(state: dict, output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Writes ckpt_<step>.pt atomically, then deletes the older checkpoints beyond the newest `keep`, and the
    temporary files of writes that a killed process left behind."""
    path = checkpoint_dir(output_dir) / f"ckpt_{step:09d}.pt"
    atomic_save(state, path)
    older = [p for p in list_checkpoints(output_dir) if _step(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)
    for stray in path.parent.glob(".ckpt_*.pt.tmp*"):  # atomic_save removed its own: these are a dead writer's
        stray.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def _damage(path: Path) -> str | None:
    """Why `path` is not a whole checkpoint as torch writes one (a zip archive holding data.pkl, every record
    matching its CRC), or None. Decided from the file's structure, not from torch.load's exception (damage
    surfaces there as EOFError, OSError, UnpicklingError, RuntimeError, ... or not at all: torch does not
    check CRCs, so a changed byte in tensor data loads silently). OSError: the file cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                return "no data.pkl record"
            bad = archive.testzip()
            return f"record {bad} does not match its CRC" if bad is not None else None
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - BadZipFile, EOFError, struct errors: all say "not a whole archive"
        return f"{type(err).__name__}: {err}"


def load_latest(output_dir: str | os.PathLike, quarantine: bool = False) -> tuple[dict | None, Path | None]:
    """The newest checkpoint that loads (onto the CPU); (None, None) for a run without checkpoints.

    A damaged one (torn, truncated, corrupt: see _damage) is skipped with a warning naming it; with `quarantine`
    (rank 0) it is renamed to <name>.corrupt so that it can neither shadow nor displace the checkpoints written
    after it. A whole file that fails to load (I/O error, memory, a type this torch refuses) raises ResumeError
    and stays in place. A run whose checkpoints (.corrupt ones included) are all damaged raises ResumeError
    instead of silently starting again from step 0: move them away, or choose another output_dir, to start
    afresh."""
    unreadable = sorted(checkpoint_dir(output_dir).glob("ckpt_*.pt.corrupt"))
    for path in reversed(list_checkpoints(output_dir)):
        try:
            reason = _damage(path)
            if reason is None:
                state = load(path, "cpu")
                if isinstance(state, dict) and "model" in state and "step" in state:
                    return state, path
                reason = "not a training checkpoint (no model/step entries)"
        except FileNotFoundError:  # renamed by rank 0 meanwhile: damaged
            unreadable.append(path)
            continue
        except Exception as err:
            raise ResumeError(f"checkpoint {path} could not be read ({_causes(err)}); it is left in place: "
                              "fix the cause and run again") from err
        warnings.warn(f"checkpoint {path} is damaged ({reason}); trying the previous one", stacklevel=2)
        unreadable.append(path)
        if quarantine:
            try:
                path.rename(path.with_name(path.name + ".corrupt"))
            except OSError:  # another process renamed it first
                pass
    if unreadable:
        raise ResumeError(f"no readable checkpoint in {checkpoint_dir(output_dir)}; damaged: "
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


# ----------------------------------------------------------------------------- a run's state
def training_state(run: RunState, cfg, world_size: int, device: torch.device) -> dict:
    """What a checkpoint holds: weights, optimizer, scaler, progress, this rank's RNG streams, the config."""
    p = run.progress
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "step": p.step, "epoch": p.epoch, "step_in_epoch": p.step_in_epoch,
             "rng_cpu": torch.get_rng_state(), "world_size": world_size, "config": cfg.to_dict()}
    if device.type == "cuda":  # this rank's device only: a restart may see fewer devices (CUDA_VISIBLE_DEVICES)
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict, run: RunState, device: torch.device) -> Progress:
    """Loads a training_state() dict into the run (weights are copied to their device) and returns its progress."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    cuda_state = state.get("rng_cuda")
    if isinstance(cuda_state, (list, tuple)):  # older checkpoints held every visible device's state
        cuda_state = cuda_state[device.index] if device.type == "cuda" and device.index < len(cuda_state) else None
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
    return Progress(state["step"], state["epoch"], state["step_in_epoch"])


# ----------------------------------------------------------------------------- every rank alike
def _problem(err: Exception, context: str = "") -> str:
    return str(err) if isinstance(err, ResumeError) else f"{context}{type(err).__name__}: {err}"


def _agree(ctx, problem: str | None, what) -> list:
    """Every rank's `what`; raises ResumeError on every rank alike when any rank had a problem, so no rank is left
    waiting in a collective that a failed one skipped."""
    outcomes = [(problem, what)]
    if ctx.world_size > 1:
        outcomes = [None] * ctx.world_size
        torch.distributed.all_gather_object(outcomes, (problem, what))
    failed = [(r, p) for r, (p, _) in enumerate(outcomes) if p is not None]
    if failed:
        raise ResumeError(failed[0][1] if len({p for _, p in failed}) == 1 and len(failed) == len(outcomes)
                          else "; ".join(f"rank {r}: {p}" for r, p in failed))
    return [w for _, w in outcomes]


def hold_output_dir_on_rank0(output_dir: str, ctx, wait_s: float):
    """Rank 0 locks output_dir (hold_output_dir) and returns the handle; every rank raises alike if it cannot.
    The other ranks wait in a broadcast meanwhile: keep wait_s within the collective timeout."""
    lock, problem = None, None
    if ctx.is_main:
        try:
            lock = hold_output_dir(output_dir, wait_s=min(LOCK_WAIT_S, wait_s))
        except Exception as err:  # noqa: BLE001 - whatever it is, every rank must hear of it
            problem = _problem(err, f"output_dir {output_dir}: ")
    if ctx.world_size > 1:  # only rank 0 can fail here: its outcome is every rank's
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise ResumeError(problem)
    return lock


def load_resume_state(output_dir: str, ctx) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from, the same on every rank. Each rank reads output_dir itself: on folders that
    are not one shared file system nodes could see different ones and train on silently diverged weights, so
    ranks that would resume different steps (or fail to read) stop together with the reason."""
    state, path, problem = None, None, None
    try:
        state, path = load_latest(output_dir, quarantine=ctx.is_main)
    except Exception as err:  # noqa: BLE001 - whatever it is, every rank must hear of it
        problem = _problem(err)
    steps = _agree(ctx, problem, (state["step"] if state is not None else 0, str(path)))
    if len({s for s, _ in steps}) > 1:
        raise ResumeError("ranks would resume different checkpoints: " + "; ".join(
            f"rank {r}: step {s} ({p})" for r, (s, p) in enumerate(steps))
            + ". output_dir must be one folder that every node sees the same")
    return state, path
