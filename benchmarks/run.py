"""Runs every benchmark and writes JSON, CSV, PNG plots and a markdown summary to benchmarks/results/<machine>-<date>/.

    python -m benchmarks.run [--device cpu|cuda|cuda:N] [--quick] [--out DIR] [--only step,loss,...]

Each speed claim is a ratio against a baseline measured in the same run: the full SimCLR step against the
bare model forward/backward, the rank's NT-Xent slice against the full matrix, LARS against SGD, the cached
step against the direct one, the trainer's DDP/cuDNN settings against DDP's defaults, the trainer's loop against
its own data wait.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import comm, ddp, loss, optimizer, step
from benchmarks.common import add_device_argument, emit, environment, init_one_process
from trainer import distributed

# dense bf16 tensor-core peak per GPU model, FLOP/s (vendor data sheets)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}
# ResNet forward multiply-accumulates per 224x224 image (torchvision's published GMACs)
GMACS_224 = {"resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09}


def train_flops_per_view(model: str, image_size: int) -> float:
    """Forward + backward FLOPs of one view: 2 FLOPs per MAC, backward = 2x forward; scaled by pixel count."""
    return GMACS_224[model] * 1e9 * 2 * 3 * (image_size / 224) ** 2


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def step_suite(ctx, scale: str) -> dict:
    """Overhead ratio, AMP and channels_last on/off, and a per-device batch sweep with memory and MFU."""
    cuda = ctx.device.type == "cuda"
    model, size = ("resnet50", 224) if cuda else ("resnet18", 32)
    batches = {"tiny": [2, 4], "quick": [64, 128, 256] if cuda else [16, 32, 64],
               "full": [64, 128, 256, 384] if cuda else [16, 32, 64, 128]}[scale]
    if scale == "tiny":
        size = 16
    rounds = {"tiny": 1, "quick": 3, "full": 5}[scale]
    variants = {"default": dict(amp="auto", channels_last=True)}
    variants["amp_off"] = dict(amp="off", channels_last=True)
    if cuda:
        variants["channels_last_off"] = dict(amp="auto", channels_last=False)
        variants["compile"] = dict(amp="auto", channels_last=True, compile_model=True)
    rows = []
    for name, opts in variants.items():
        rows.append({"variant": name, "per_device_batch": batches[len(batches) // 2],
                     **step.measure(ctx, model, size, batches[len(batches) // 2], rounds=rounds, **opts)})
    sweep = []
    for batch in batches:
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            result = step.measure(ctx, model, size, batch, "auto", True, rounds)
        except torch.OutOfMemoryError:
            sweep.append({"per_device_batch": batch, "fits": False})
            torch.cuda.empty_cache()
            continue
        views_per_s = 2 * result["img_per_s_per_rank"]["full_step"]
        entry = {"per_device_batch": batch, "fits": True, "img_per_s": result["img_per_s_per_rank"]["full_step"],
                 "overhead_ratio": result["overhead_ratio"]}
        if cuda:
            entry["peak_mem_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30
            peak = peak_flops(ctx.device)
            entry["mfu"] = views_per_s * train_flops_per_view(model, size) / peak if peak else None
        sweep.append(entry)
    fitting = [s for s in sweep if s["fits"]]
    best = max(fitting, key=lambda s: s["img_per_s"]) if fitting else None
    return {"model": model, "image_size": size, "variants": rows, "batch_sweep": sweep,
            "fastest_fitting_batch": best["per_device_batch"] if best else None}


def end_to_end(scale: str) -> dict:
    """steps/s of `python -m trainer.main` on the quickstart config with the loader in the loop."""
    with tempfile.TemporaryDirectory() as out:
        steps = {"tiny": 8, "quick": 12, "full": 40}[scale]
        cmd = [sys.executable, "-m", "trainer.main", "--config", "configs/quickstart.yaml", f"output_dir={out}",
               f"max_steps={steps}", "log_every_n_steps=4", "eval.final_probe=false", "eval.knn_monitor=false",
               "eval_every_n_epochs=1000"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=1800)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"trainer.main failed: {proc.stderr[-2000:]}")
        records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][1:]  # the first interval holds warm-up
    loop_s = sum(r["step_time_s"] for r in train) * 4
    return {"steps": steps, "wall_s_including_startup": wall,
            "steps_per_s": len(train) * 4 / loop_s if loop_s else None,
            "img_per_s": sum(r["img_per_s"] for r in train) / max(len(train), 1),
            "data_wait_frac": sum(r["data_wait_frac"] for r in train) / max(len(train), 1)}


def large_batch_fresh_process(image_size: int, batch: int, chunk: int, device: str, rounds: int) -> dict:
    """The cached-vs-direct benchmark in its own process: its CPU peak-memory reading needs a fresh heap."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "large_batch.json"
        subprocess.run([sys.executable, "-m", "benchmarks.large_batch", "--image-size", str(image_size), "--batch",
                        str(batch), "--chunk", str(chunk), "--device", device, "--rounds", str(rounds), "--out",
                        str(out)], check=True, capture_output=True, cwd=Path(__file__).parents[1], timeout=1800)
        return json.loads(out.read_text())


def loader_suite(scale: str, device: str) -> dict:
    try:
        from benchmarks import loader
    except ImportError as err:
        return {"skipped": f"loader benchmark unavailable: {err}"}
    return loader.run(quick=scale != "full", device=device)


def plot(results: dict, folder: Path) -> list[str]:
    """PNG plots of the batch sweep and the NT-Xent memory; skipped (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    if "step" in results:
        sweep = [s for s in results["step"]["batch_sweep"] if s["fits"]]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([s["per_device_batch"] for s in sweep], [s["img_per_s"] for s in sweep], marker="o")
        ax.set(xlabel="per-device batch (images)", ylabel="images/s", title="SimCLR step throughput")
        fig.tight_layout()
        fig.savefig(folder / "step_batch_sweep.png", dpi=120)
        plt.close(fig)
        made.append("step_batch_sweep.png")
    if "loss" in results:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for world in (1, 2, 8):
            rows = [r for r in results["loss"]["results"] if r["world_size"] == world]
            ax.plot([r["global_batch"] for r in rows], [r["slice_peak_bytes"] / 2 ** 20 for r in rows], marker="o",
                    label=f"rank slice, {world} ranks")
        rows = [r for r in results["loss"]["results"] if r["world_size"] == 1]
        ax.plot([r["global_batch"] for r in rows], [r["full_peak_bytes"] / 2 ** 20 for r in rows], "k--",
                label="full 2N x 2N")
        ax.set(xscale="log", yscale="log", xlabel="global batch", ylabel="peak MiB per rank", title="NT-Xent memory")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "loss_memory.png", dpi=120)
        plt.close(fig)
        made.append("loss_memory.png")
    return made


def summary(results: dict, env: dict) -> str:
    lines = [f"# Benchmarks on {env['machine']} ({env['processor'] or env['platform']}, {env['cpu_count']} CPUs"
             f"{', ' + env['gpu'] if env.get('gpu') else ''})",
             "", f"torch {env['torch']}, CUDA {env['cuda']}, commit {env['commit']}, {env['time_utc']}", ""]
    if "step" in results:
        s = results["step"]
        default = s["variants"][0]
        lines += ["## Step", f"- full step / bare forward+backward: **{default['overhead_ratio']:.2f}** (goal >= 0.90)"]
        lines += [f"- {v['variant']}: {v['img_per_s_per_rank']['full_step']:.1f} img/s" for v in s["variants"]]
        lines += [f"- fastest per-device batch that fits: {s['fastest_fitting_batch']}", ""]
    if "loss" in results:
        r = max(results["loss"]["results"], key=lambda r: (r["global_batch"], r["world_size"]))
        lines += ["## NT-Xent", f"- global {r['global_batch']} on {r['world_size']} ranks: "
                  f"{r['slice_peak_bytes'] / 2**20:.0f} MiB per rank "
                  f"(2n x 2N x 4 B = {r['logit_slice_bytes'] / 2**20:.0f} MiB) vs full matrix "
                  f"{r['full_peak_bytes'] / 2**20:.0f} MiB: {r['memory_ratio_full_over_slice']:.1f}x less", ""]
    if "optimizer" in results:
        o = results["optimizer"]["results"]
        lines += ["## Optimizer", f"- LARS / SGD step time: **{o['lars_over_sgd']:.2f}** (goal <= 1.3)", ""]
    if "large_batch" in results:
        lb = results["large_batch"]["results"]
        lines += ["## Cached large-batch step",
                  f"- peak memory cached/direct {lb['memory_ratio_cached_over_direct']:.2f}"
                  f", step time {lb['time_ratio_cached_over_direct']:.2f}x", ""]
    if "comm" in results:
        lines += ["## Communication (gloo, 2 processes)"]
        lines += [f"- {r['op']} {r.get('global_batch', '')}: {r['s'] * 1e3:.2f} ms, {r['algbw_gb_s']:.2f} GB/s"
                  for r in results["comm"]["results"]["rows"]]
        lines.append("")
    if "loader" in results and "96px" in results["loader"].get("results", {}):
        lr = results["loader"]["results"]
        lines += ["## Loader (samples/s as two views)"]
        for size in ("96px", "224px"):
            r = lr[size]
            lines.append(f"- {size}: (a) FFCV {r['a_ffcv_two_views']:.0f} (stock two pipelines "
                         f"{r['a0_stock_ffcv_two_pipelines']:.0f}), (b) the seed's PIL pipeline "
                         f"{r['b_torchvision_full_augmentation']:.0f}, (c) JPEG decode {r['c_jpeg_decode_only']:.0f}, "
                         f"(d) device augment {r['d_device_augment_views_per_s']:.0f} views/s; "
                         f"**a/b {r['ratio_a_over_b']:.2f}** (goal >= 3), "
                         f"**a/c {r['ratio_a_over_c']:.2f}** (goal >= 0.5)")
        lines.append("")
    if "step" in results or "loader" in results:
        batch = results.get("step", {}).get("fastest_fitting_batch")
        workers = results.get("loader", {}).get("results", {}).get("ffcv_workers_sweep_96px", {}).get("fastest_workers")
        fastest = ([f"per-device batch {batch}"] if batch is not None else []) + \
                  ([f"loader workers {workers}"] if workers is not None else [])
        lines += ["## Tuning", f"- fastest setting here: {', '.join(fastest)}", ""]
    if "ddp" in results:
        d = results["ddp"]
        lines += [f"## DDP settings ({d['config']['ranks']} ranks, {d['config']['backend']}, {d['config']['model']} at "
                  f"{d['config']['image_size']} px), steps/s relative to DDP's defaults"]
        memory = d["results"].get("memory_over_defaults") or {}
        lines += [f"- {name}: {ratio:.2f}x" + (f", peak memory {memory[name]:.2f}x" if name in memory else "")
                  for name, ratio in d["results"]["speed_over_defaults"].items()]
        lines.append("")
    if "end_to_end" in results:
        e = results["end_to_end"]
        lines += ["## End to end (quickstart, 1 process)", f"- {e['steps_per_s']:.2f} steps/s, "
                  f"{e['img_per_s']:.0f} img/s, waiting for data {e['data_wait_frac']:.1%} of the loop", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds (minutes on a laptop CPU)")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes: checks the report, not speeds")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<machine>-<date>)")
    parser.add_argument("--only", help="comma-separated subset: step,loss,optimizer,large_batch,comm,ddp,end_to_end,"
                                       "loader")
    args = parser.parse_args(argv)
    env = environment()
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{env.get('gpu') or platform.node()}-{time.strftime('%Y%m%d')}")
    folder = Path(args.out or Path(__file__).parent / "results" / tag)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else {"step", "loss", "optimizer", "large_batch", "comm", "ddp",
                                                              "end_to_end", "loader"}
    ctx = init_one_process(args.device)
    device = str(ctx.device)  # every benchmark below runs on this one device (cuda:N as given)
    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    results: dict = {}
    lb_batch, lb_chunk = {"tiny": (4, 4), "quick": (32, 16), "full": (128, 32)}[scale]
    jobs = {"step": lambda: step_suite(ctx, scale),
            "loss": lambda: loss.run(device, scale != "full", batches=[256] if scale == "tiny" else None),
            "optimizer": lambda: optimizer.run(device, "resnet18" if scale == "tiny" else "resnet50",
                                               rounds={"tiny": 1, "quick": 7, "full": 9}[scale]),
            "large_batch": lambda: large_batch_fresh_process(16 if scale == "tiny" else 32, lb_batch, lb_chunk,
                                                             device, 1 if scale == "tiny" else 2),
            "comm": lambda: comm.run(quick=scale != "full"),
            "ddp": lambda: ddp.run(args.device, image_size=16 if scale == "tiny" else 0,
                                   batch=4 if scale == "tiny" else 0, rounds={"tiny": 1, "quick": 3, "full": 5}[scale]),
            "end_to_end": lambda: end_to_end(scale),
            "loader": lambda: loader_suite(scale, device)}
    try:
        for name, job in jobs.items():
            if name in wanted:
                print(f"benchmark {name} ...", file=sys.stderr, flush=True)
                results[name] = job()
    finally:
        distributed.shutdown()
    report = {"environment": env, "config": vars(args), "results": results}
    emit(report, str(folder / "report.json"))
    with open(folder / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "metric", "value"])
        for name, value in _flatten(results):
            writer.writerow([name.split(".")[0], name, value])
    plots = plot(results, folder)
    (folder / "summary.md").write_text(summary(results, env) + "\n" + "".join(f"\n![{p}]({p})\n" for p in plots))
    tuning = [line for line in summary(results, env).splitlines() if line.startswith("- fastest setting")]
    print(f"wrote {folder}" + (f"\n{tuning[0][2:]}" if tuning else ""), file=sys.stderr)
    return 0


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _flatten(value, f"{prefix}{i}.")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix.rstrip("."), tree


if __name__ == "__main__":
    sys.exit(main())
