"""The GPU acceptance run's correctness checks: the CUDA-marked tests (a), every step mode x amp x compile (b), and
resume equal to an uninterrupted run (c)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_checks_setup import (
    REPO,
    augmented_views,
    check_config,
    free_memory,
    network,
    step_function,
    training_pieces,
)


def check_a_cuda_tests(s: dict, ctx, limit: float, dry: bool) -> dict:
    goal = "pytest -m cuda passes"
    if dry:
        return {"status": "skipped", "goal": goal, "note": "dry run: the CUDA-marked tests need a GPU"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=limit)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", tail)}
    return {"status": "pass" if proc.returncode == 0 else "fail", "goal": goal, "returncode": proc.returncode,
            "summary": tail, **counts, **({} if proc.returncode == 0 else {"output_tail": proc.stdout[-3000:]})}


def check_b_step_modes(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer.config import ConfigError

    backend = "eager" if dry else "inductor"  # the dry run traces with dynamo but skips code generation
    runs, failed = [], []
    for mode in ("direct", "cached", "checkpoint"):
        for amp in ("bf16", "fp16"):
            for compiled in (False, True):
                row = {"step_mode": mode, "amp": amp, "compile": compiled}
                overrides = [f"step_mode={mode}", f"amp={amp}", f"compile={str(compiled).lower()}",
                             "optim.name=sgd", "optim.base_lr=0.1", "optim.lr_scaling=none", "loss.temperature=0.2"]
                try:
                    cfg = check_config(s, s["small_model"], s["small_size"], s["small_batch"], *overrides)
                except ConfigError as err:
                    expected = compiled and mode == "checkpoint" and "compile" in str(err) and "step_mode" in str(err)
                    row.update(outcome="refused by the config", message=str(err), ok=expected)
                    runs.append(row)
                    failed += [] if expected else [row]
                    continue
                start = time.perf_counter()
                if compiled:  # fresh dynamo caches: each new model would count towards its recompile limit
                    torch._dynamo.reset()
                model, train_model = network(cfg, ctx, compile_backend=backend if compiled else None)
                loss_fn, optimizer, scaler, amp_dtype = training_pieces(cfg, model, ctx.device)
                views = 2 * cfg.batch_size
                step_fn, chunk = step_function(cfg, model, views, ctx.device, amp_dtype, chunk=views // 2)
                x1, x2 = augmented_views(cfg.batch_size, s["small_size"], ctx.device)
                losses = [step_fn(train_model, loss_fn, optimizer, scaler, x1, x2, amp_dtype)[0]
                          for _ in range(s["steps"])]
                losses = torch.stack(losses).float().tolist()  # host sync: once, after the steps
                ok = all(math.isfinite(v) for v in losses) and min(losses[-2:]) < losses[0]
                row.update(outcome="ran", losses=losses, chunk_views=chunk, ok=ok,
                           seconds=time.perf_counter() - start)
                runs.append(row)
                failed += [] if ok else [row]
                del model, train_model, optimizer
                free_memory(ctx.device)
    return {"status": "fail" if failed else "pass", "goal": "finite loss, last two steps below the first, "
            "on one fixed batch (SGD lr 0.1); compile+checkpoint refused naming both keys",
            "compile_backend": backend, "runs": runs, "failed": len(failed)}


def _trainer_run(s: dict, out: Path, limit: float, *extra: str) -> None:
    """`python -m trainer.main` on a tiny synthetic run (deterministic algorithms where they exist, warn-only)."""
    args = ["--config", str(REPO / "configs/quickstart.yaml"), "dataset.name=synthetic", "dataset.synthetic_size=96",
            f"dataset.input_shape=({s['small_size']},{s['small_size']},3)", "model.small_stem=true",
            f"model.base_model={s['small_model']}", "model.out_dim=16", "batch_size=16", "epochs=2",
            "log_every_n_steps=2", "eval.final_probe=false", "eval.knn_monitor=false", "optim.warmup_epochs=1",
            f"amp={s['amp']}", f"device={s['device']}", f"output_dir={out}", *extra]
    code = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
            "from trainer.main import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                                     "1")}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=limit)
    if proc.returncode:
        raise RuntimeError(f"trainer.main {' '.join(extra)} exited {proc.returncode}: {proc.stderr[-2000:]}")


def _state_difference(a: dict, b: dict) -> tuple[bool, float]:
    """(bitwise equal, largest absolute difference) over model parameters, buffers and optimizer buffers."""
    pairs = [(a["model"][k], b["model"][k]) for k in a["model"]]
    pairs += [(x[n], y[n]) for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
              for n in x if torch.is_tensor(x[n])]
    equal = all(torch.equal(x, y) for x, y in pairs)
    diff = max(((x.double() - y.double()).abs().max().item() if x.is_floating_point() else
                float((x != y).any())) for x, y in pairs)
    return equal, diff


def check_c_resume(s: dict, ctx, limit: float, dry: bool) -> dict:
    from trainer import checkpoint

    deadline = time.monotonic() + limit
    with tempfile.TemporaryDirectory() as tmp:
        straight, split, control = Path(tmp, "straight"), Path(tmp, "split"), Path(tmp, "control")
        _trainer_run(s, straight, deadline - time.monotonic())
        total = checkpoint.load_latest(straight)[0]["step"]
        _trainer_run(s, split, deadline - time.monotonic(), f"max_steps={total // 2 + 1}")  # stops mid-epoch
        _trainer_run(s, split, deadline - time.monotonic())  # the same command again resumes
        a, b = checkpoint.load_latest(straight)[0], checkpoint.load_latest(split)[0]
        equal, diff = _state_difference(a, b)
        result = {"steps": total, "resumed_at": total // 2 + 1, "bitwise_equal": equal, "max_abs_difference": diff,
                  "goal": "resumed run bitwise equal to the uninterrupted one (or, where kernels are not "
                          "deterministic, no further from it than a second uninterrupted run is)"}
        if equal:
            return {"status": "pass", **result}
        _trainer_run(s, control, deadline - time.monotonic())  # how far two uninterrupted runs drift apart here
        control_equal, control_diff = _state_difference(a, checkpoint.load_latest(control)[0])
        ok = not control_equal and diff <= 2 * control_diff
        return {"status": "pass" if ok else "fail", **result, "control_bitwise_equal": control_equal,
                "control_max_abs_difference": control_diff}

