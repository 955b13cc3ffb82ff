"""The quickstart's training rate in two process layouts on this machine: 1 process x N threads vs N processes x 1
thread.

    python -m benchmarks.quickstart [--config configs/quickstart.yaml] [--cores 2] [--steps 12] [--rounds 2]
        [--out DIR] [--set key=value ...]

Each layout runs the real trainer (`python -m trainer.main` with OMP_NUM_THREADS=N, and `torchrun --standalone
--nproc_per_node=N` with OMP_NUM_THREADS=1) for --steps optimizer steps of the config, with the final probe and
kNN monitor off; the layouts alternate over --rounds so that load from other processes hits both alike. Rates
come from the trainer's own interval records (metrics.jsonl: step_time_s, img_per_s), the first interval of each
run left out as warm-up. Reports steps/s, images/s, the ratio, the time the config's full training would take
at each rate (steps x seconds per step), and the CPU model, as JSON and markdown.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import cpu_model, emit_with_summary, environment, run_trainer
from trainer.config_load import load_config

REPO = Path(__file__).resolve().parent.parent


def layouts(cores: int) -> dict[str, dict]:
    return {f"1 process x {cores} threads": {"processes": 1, "threads": cores},
            f"{cores} processes x 1 thread": {"processes": cores, "threads": 1}}


def run_layout(config: str, overrides: list[str], processes: int, threads: int, steps: int, log_every: int,
               workdir: Path) -> dict:
    """One short training run; the median step time of its intervals after the first."""
    out = workdir / f"p{processes}t{threads}"
    args = ["--config", config, f"output_dir={out}", f"max_steps={steps}", f"log_every_n_steps={log_every}",
            "eval.final_probe=false", "eval.knn_monitor=false", "eval_every_n_epochs=100000", *overrides]
    if processes == 1:
        cmd = [sys.executable, "-m", "trainer.main", *args]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={processes}", "-m", "trainer.main", *args]
    records, wall_s = run_trainer(cmd, threads, out)
    train = [r for r in records if r["kind"] == "train"][1:]  # the first interval holds the warm-up
    if not train:
        raise RuntimeError(f"{steps} steps at log_every_n_steps={log_every} left no interval after the first")
    return {"step_time_s": statistics.median(r["step_time_s"] for r in train),
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in train), "wall_s": wall_s}


def markdown(report: dict) -> str:
    r, c = report["results"], report["config"]
    lines = [f"# Quickstart training rate by process layout ({c['model']}, {c['image_size']} px, global batch "
             f"{c['batch_size']})", "",
             f"CPU: {report['cpu_model']} ({report['environment']['cpu_count']} cores); {c['steps']} steps per run, "
             f"{c['rounds']} alternating rounds, median interval after the first.", "",
             "| layout | steps/s | images/s | s/step | full training (steps x s/step) |", "|---|---|---|---|---|"]
    for name, row in r["layouts"].items():
        lines.append(f"| {name} | {row['steps_per_s']:.2f} | {row['img_per_s']:.0f} | {row['step_time_s']:.3f} | "
                     f"{row['full_training_s']:.0f} s ({c['total_steps']} steps) |")
    lines += ["", f"Faster: **{r['faster']}** ({r['speedup']:.2f}x the other)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--cores", type=int, default=2, help="threads of the 1-process layout = processes of the other")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first interval is warm-up)")
    parser.add_argument("--log-every", type=int, default=2, help="interval length in steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="folder for quickstart.json and quickstart.md")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="a config override (repeat for more)")
    args = parser.parse_args(argv)
    cfg = load_config(REPO / args.config, args.overrides)
    import torch

    from trainer.distributed import DistContext
    from trainer.inputs import build_pretrain_data  # the run's own step count, from its own data split
    steps_per_epoch = build_pretrain_data(cfg, DistContext(0, 0, 1, torch.device("cpu"), "gloo")).train.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    samples: dict[str, list[dict]] = {name: [] for name in layouts(args.cores)}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, layout in layouts(args.cores).items():
                result = run_layout(args.config, args.overrides, layout["processes"], layout["threads"], args.steps,
                                    args.log_every, Path(tmp) / f"round{round_}")
                samples[name].append(result)
                print(f"round {round_} {name}: {result['step_time_s']:.3f} s/step", flush=True)
    rows = {}
    for name, runs in samples.items():
        step_s = statistics.median(r["step_time_s"] for r in runs)
        rows[name] = {**layouts(args.cores)[name], "step_time_s": step_s, "steps_per_s": 1 / step_s,
                      "img_per_s": cfg.batch_size / step_s, "full_training_s": total_steps * step_s,
                      "data_wait_frac": statistics.median(r["data_wait_frac"] for r in runs),
                      "per_round_step_time_s": [r["step_time_s"] for r in runs]}
    (fast, slow) = sorted(rows, key=lambda n: rows[n]["step_time_s"])
    report = {"benchmark": "quickstart", "environment": environment(), "cpu_model": cpu_model(),
              "config": {"file": args.config, "overrides": args.overrides, "model": cfg.model.base_model,
                         "image_size": cfg.dataset.image_size, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                         "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "steps": args.steps,
                         "rounds": args.rounds},
              "results": {"layouts": rows, "faster": fast,
                          "speedup": rows[slow]["step_time_s"] / rows[fast]["step_time_s"]}}
    emit_with_summary(report, args.out, "quickstart", markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
