"""CPU training-step time: castlora's ``train_lora`` vs diffusers' ``train_dreambooth_lora_sdxl.py``.

Run from the repository root (the diffusers script is *not* part of this repository; pass its path):

    python -m benchmarks.bench_train --diffusers-script /path/to/train_dreambooth_lora_sdxl.py

Both sides train a rank-4 U-Net LoRA on the tiny SDXL model (``pipeline.models.tiny_sdxl``) with the same
five photos, prompt, resolution, batch 1, lr 1e-4 (constant), fp32, no prior preservation, no validation
and the same torch thread count. Every run is its own subprocess, timed from spawn to exit; its peak RSS
comes from ``os.wait4``. Per-step time is the slope between a short and a long run,
``(T(n2) - T(n1)) / (n2 - n1)``, so start-up, model loading, caching and the final save cancel out.
Prints a table and writes ``benchmarks/results/train_cpu.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `python benchmarks/bench_train.py` puts benchmarks/ first on sys.path
    sys.path.insert(0, str(_REPO))

from benchmarks.machine import cpu_name  # noqa: E402

IMAGES = _REPO / "samples/dog6__dog2/dog6"
RESULTS = _REPO / "benchmarks/results/train_cpu.json"
PROMPT = "a photo of olis dog"
RANK = 4
LR = 1e-4
SEED = 0
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


# ----------------------------------------------------------------------------------------------- workers


def run_ours_worker(args: argparse.Namespace) -> None:
    """One castlora training run in this process; writes ``result.metrics`` to ``--result-json``."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from pipeline.train import TrainConfig, TrainingSample, train_lora

    torch.set_num_threads(args.threads)
    samples = [
        TrainingSample(
            sample_id=hashlib.sha256(path.read_bytes()).hexdigest(),
            image_path=str(path),
            prompt=PROMPT,
            kind="instance",
        )
        for path in sorted(Path(args.images).iterdir())
        if path.suffix.lower() in PHOTO_SUFFIXES
    ]
    config = TrainConfig(
        steps=args.steps,
        resolution=args.resolution,
        rank=RANK,
        alpha=float(RANK),  # diffusers' script uses lora_alpha = rank
        lr=LR,
        lr_scheduler="constant",
        segmix_p=0.0,
        prior_weight=0.0,
        checkpoint_every=10**6,
        log_every=10**6,
        batch_size=1,
        mixed_precision="no",
        seed=SEED,
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model_dir)
    work = Path(args.work_dir)
    result = train_lora(pipe, samples, config, work / "out", work / "cache")
    Path(args.result_json).write_text(json.dumps(result.metrics, default=str))


# ----------------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Run:
    wall_s: float
    peak_rss_mb: float
    metrics: dict


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH", "")])),
    )
    return env


def spawn(command: list[str], threads: int, log_path: Path) -> tuple[float, float]:
    """Wall seconds from spawn to exit, and the child's peak RSS in MiB (``ru_maxrss`` is KiB on Linux)."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=_REPO, env=_child_env(threads), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # already reaped: stop Popen from waiting again
    if child.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])}… exited {child.returncode}; log {log_path}:\n{tail}")
    return wall, usage.ru_maxrss / 1024


def run_ours(args: argparse.Namespace, model_dir: Path, steps: int, resolution: int, scratch: Path) -> Run:
    work = Path(tempfile.mkdtemp(prefix=f"ours-{resolution}-{steps}-", dir=scratch))  # fresh: no resume, no cache
    result_json = work / "metrics.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_train",
        "--worker",
        "ours",
        "--steps",
        str(steps),
        "--resolution",
        str(resolution),
        "--threads",
        str(args.threads),
        "--model-dir",
        str(model_dir),
        "--images",
        str(args.images),
        "--work-dir",
        str(work),
        "--result-json",
        str(result_json),
    ]
    wall, rss = spawn(command, args.threads, work / "log.txt")
    return Run(wall, rss, json.loads(result_json.read_text()))


def run_diffusers(args: argparse.Namespace, model_dir: Path, steps: int, resolution: int, scratch: Path) -> Run:
    work = Path(tempfile.mkdtemp(prefix=f"diffusers-{resolution}-{steps}-", dir=scratch))
    command = [
        sys.executable,
        str(args.diffusers_script),
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--instance_data_dir",
        str(args.images),
        "--instance_prompt",
        PROMPT,
        "--output_dir",
        str(work / "out"),
        "--resolution",
        str(resolution),
        "--center_crop",  # ours centre-crops; diffusers defaults to a random crop
        "--train_batch_size",
        "1",
        "--max_train_steps",
        str(steps),
        "--rank",
        str(RANK),
        "--learning_rate",
        str(LR),
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--seed",
        str(SEED),
        "--checkpointing_steps",
        "1000000",
        "--mixed_precision",
        "no",
    ]
    wall, rss = spawn(command, args.threads, work / "log.txt")
    return Run(wall, rss, {})


def slope_ms(short: float, long: float, n1: int, n2: int) -> float:
    return (long - short) / (n2 - n1) * 1000


def measure(args: argparse.Namespace, method: str, model_dir: Path, resolution: int, scratch: Path) -> dict:
    """Best-of-``repeats`` wall time at n1 and n2 steps, alternating the two so load drifts hit both."""
    runner = run_ours if method == "ours" else run_diffusers
    runs: dict[int, list[Run]] = {args.n1: [], args.n2: []}
    for _ in range(args.repeats):
        for steps in (args.n1, args.n2):
            run = runner(args, model_dir, steps, resolution, scratch)
            runs[steps].append(run)
            print(f"  {method:<9} {resolution:>4}px {steps:>3} steps: {run.wall_s:6.2f} s, {run.peak_rss_mb:6.0f} MiB")
    best = {steps: min(r.wall_s for r in rs) for steps, rs in runs.items()}
    row = {
        "method": method,
        "resolution": resolution,
        "wall_s": {str(steps): [r.wall_s for r in rs] for steps, rs in runs.items()},
        "step_ms": slope_ms(best[args.n1], best[args.n2], args.n1, args.n2),
        "peak_rss_mb": max(r.peak_rss_mb for rs in runs.values() for r in rs),
        "startup_s": best[args.n1] - args.n1 * slope_ms(best[args.n1], best[args.n2], args.n1, args.n2) / 1000,
    }
    if method == "ours":
        long_runs = runs[args.n2]
        row["mean_step_ms_reported"] = min(r.metrics["mean_step_s"] for r in long_runs) * 1000
        row["cache_s_reported"] = min(r.metrics["cache_seconds"] for r in long_runs)
    return row


def machine(threads: int) -> dict:
    import diffusers
    import torch

    return {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": threads,
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'res':>5} {'method':<10} {'ms/step':>8} {'speedup':>8} {'peak RSS MiB':>13} {'start-up s':>10} "
        f"{'ours mean_step_s ms':>20}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        speedup = f"{row['speedup']:.2f}×" if "speedup" in row else ""
        reported = f"{row['mean_step_ms_reported']:.1f}" if "mean_step_ms_reported" in row else ""
        print(
            f"{row['resolution']:>5} {row['method']:<10} {row['step_ms']:>8.1f} {speedup:>8} "
            f"{row['peak_rss_mb']:>13.0f} {row['startup_s']:>10.2f} {reported:>20}"
        )


def run_benchmark(args: argparse.Namespace) -> None:
    from pipeline.models.tiny_sdxl import build_tiny_sdxl

    script = Path(args.diffusers_script)
    if not script.is_file():
        raise SystemExit(f"--diffusers-script {script} not found: fetch examples/dreambooth/{script.name} first.")
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        scratch = Path(tmp)
        model_dir = scratch / "tiny_sdxl"
        build_tiny_sdxl(model_dir)
        rows = []
        for resolution in args.resolutions:
            pair = {method: measure(args, method, model_dir, resolution, scratch) for method in ("diffusers", "ours")}
            pair["ours"]["speedup"] = pair["diffusers"]["step_ms"] / pair["ours"]["step_ms"]
            pair["ours"]["rss_ratio"] = pair["ours"]["peak_rss_mb"] / pair["diffusers"]["peak_rss_mb"]
            rows += [pair["diffusers"], pair["ours"]]
    print_table(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "train_cpu",
        "command": " ".join(sys.argv),
        "diffusers_script": str(script),
        "settings": {
            "n1": args.n1,
            "n2": args.n2,
            "repeats": args.repeats,
            "rank": RANK,
            "alpha": RANK,
            "lr": LR,
            "batch_size": 1,
            "prompt": PROMPT,
            "images": str(
                Path(args.images).relative_to(_REPO) if Path(args.images).is_relative_to(_REPO) else args.images
            ),
        },
        "machine": machine(args.threads),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS.relative_to(_REPO)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-script", default="/tmp/train_dreambooth_lora_sdxl.py")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--n1", type=int, default=5, help="steps of the short run")
    parser.add_argument("--n2", type=int, default=25, help="steps of the long run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides")
    parser.add_argument("--images", default=str(IMAGES))
    # Internal: one castlora run in a subprocess.
    parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n2 <= args.n1:
        parser.error("--n2 must be larger than --n1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "ours":
        run_ours_worker(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
