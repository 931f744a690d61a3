"""Training-step time and memory: castlora's ``train_lora`` vs diffusers' ``train_dreambooth_lora_sdxl.py``.

Run from the repository root (the diffusers script is *not* part of this repository; pass its path):

    # CPU, tiny SDXL (default): fp32, one torch thread per side
    python -m benchmarks.bench_train --diffusers-script /path/to/train_dreambooth_lora_sdxl.py
    # GPU, full-size SDXL base with random weights (built once into --model-dir, ~7 GB), bf16, 1024 px
    python -m benchmarks.bench_train --device cuda --model sdxl-random --model-dir /scratch/sdxl-random \
        --resolutions 1024 --batch-sizes 1 4 --diffusers-script /path/to/train_dreambooth_lora_sdxl.py

Both sides train a rank-4 U-Net LoRA with the same photos, prompt, resolution, batch size, lr 1e-4 (constant),
precision, no prior preservation, no validation and the same torch thread count. Every run is its own
subprocess, timed from spawn to exit; its peak RSS comes from ``os.wait4`` and, on CUDA, its peak GPU memory
from ``torch.cuda.max_memory_allocated`` read at exit (the diffusers script runs under a small wrapper that
reads it the same way). Per-step time is the slope between a short and a long run,
``(T(n2) - T(n1)) / (n2 - n1)``, so start-up, model loading, caching, compiling and the final save cancel out.
Prints a table and writes ``benchmarks/results/train_<device>.json`` (or ``--results``).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import itertools
import json
import os
import platform
import runpy
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
RESULTS_DIR = _REPO / "benchmarks/results"
PROMPT = "a photo of olis dog"
RANK = 4
LR = 1e-4
SEED = 0
OURS_COMPILED = "ours-compile"
OURS = ("ours", OURS_COMPILED)
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


# ----------------------------------------------------------------------------------------------- workers


def time_backward_calls() -> list[float]:
    """Timestamps of every ``Accelerator.backward`` call in this process. Both training loops call it exactly
    once per step, so consecutive differences are whole steps measured the same way on both sides, without
    start-up or compile time (which the wall-clock slope can only cancel when it is the same in every run)."""
    from accelerate import Accelerator

    stamps: list[float] = []
    original = Accelerator.backward

    def backward(self, loss, **kwargs):
        stamps.append(time.perf_counter())
        return original(self, loss, **kwargs)

    Accelerator.backward = backward
    return stamps


def steady_step_ms(stamps: list[float]) -> float | None:
    """Median step from backward-call timestamps, skipping the first two steps (warm-up, compile)."""
    intervals = sorted(b - a for a, b in itertools.pairwise(stamps[2:]))
    return intervals[len(intervals) // 2] * 1000 if intervals else None


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
        batch_size=args.batch_size,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        compile_unet=args.compile,
        seed=SEED,
    )
    # The diffusers script loads fp32 weights and casts the frozen ones to the training precision; so does this.
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model_dir, dtype=torch.float32)
    work = Path(args.work_dir)
    stamps = time_backward_calls()
    result = train_lora(pipe, samples, config, work / "out", work / "cache")
    metrics = {**result.metrics, "steady_step_ms": steady_step_ms(stamps)}
    Path(args.result_json).write_text(json.dumps(metrics, default=str))


def run_diffusers_worker(args: argparse.Namespace) -> None:
    """Run the diffusers script in this process (its own ``__main__``) and record its peak GPU memory at exit,
    read with the same call castlora's metrics use."""
    import torch

    stamps = time_backward_calls()

    def record() -> None:
        metrics = {"steady_step_ms": steady_step_ms(stamps)}
        if torch.cuda.is_available():
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        Path(args.result_json).write_text(json.dumps(metrics))

    atexit.register(record)
    sys.argv = [args.diffusers_script, *args.script_args]
    runpy.run_path(args.diffusers_script, run_name="__main__")


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


@dataclass(frozen=True)
class Case:
    """One measured configuration: both methods run it."""

    resolution: int
    batch_size: int


def _worker_command(args: argparse.Namespace, method: str, model_dir: Path, steps: int, case: Case, work: Path):
    common = [
        sys.executable,
        "-m",
        "benchmarks.bench_train",
        "--worker",
        "ours" if method in OURS else "diffusers",
        "--result-json",
        str(work / "metrics.json"),
    ]
    if method in OURS:
        return [
            *common,
            "--steps",
            str(steps),
            "--resolution",
            str(case.resolution),
            "--batch-size",
            str(case.batch_size),
            "--mixed-precision",
            args.mixed_precision,
            "--threads",
            str(args.threads),
            "--model-dir",
            str(model_dir),
            "--images",
            str(args.images),
            "--work-dir",
            str(work),
            *(["--compile"] if method == OURS_COMPILED else []),
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        ]
    script_args = [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--instance_data_dir",
        str(args.images),
        "--instance_prompt",
        PROMPT,
        "--output_dir",
        str(work / "out"),
        "--resolution",
        str(case.resolution),
        "--center_crop",  # ours centre-crops; diffusers defaults to a random crop
        "--train_batch_size",
        str(case.batch_size),
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
        args.mixed_precision,
        *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
    ]
    return [*common, "--diffusers-script", str(args.diffusers_script), "--", *script_args]


def run_once(args: argparse.Namespace, method: str, model_dir: Path, steps: int, case: Case, scratch: Path) -> Run:
    # A fresh folder per run: no resume, no cache carried over.
    work = Path(tempfile.mkdtemp(prefix=f"{method}-{case.resolution}-b{case.batch_size}-{steps}-", dir=scratch))
    wall, rss = spawn(_worker_command(args, method, model_dir, steps, case, work), args.threads, work / "log.txt")
    return Run(wall, rss, json.loads((work / "metrics.json").read_text()))


def slope_ms(short: float, long: float, n1: int, n2: int) -> float:
    return (long - short) / (n2 - n1) * 1000


def measure(args: argparse.Namespace, method: str, model_dir: Path, case: Case, scratch: Path) -> dict:
    """Best-of-``repeats`` wall time at n1 and n2 steps, alternating the two so load drifts hit both."""
    runs: dict[int, list[Run]] = {args.n1: [], args.n2: []}
    warm_up = None
    if method == OURS_COMPILED:
        # Fills inductor's on-disk cache, so every measured run pays the same (cached) compile.
        warm_up = run_once(args, method, model_dir, args.n1, case, scratch)
        print(f"  {method:<9} {case.resolution:>4}px b{case.batch_size} compile warm-up: {warm_up.wall_s:6.2f} s")
    for _ in range(args.repeats):
        for steps in (args.n1, args.n2):
            run = run_once(args, method, model_dir, steps, case, scratch)
            runs[steps].append(run)
            gpu = f", {run.metrics['peak_gpu_mb']:7.0f} MiB GPU" if "peak_gpu_mb" in run.metrics else ""
            print(
                f"  {method:<9} {case.resolution:>4}px b{case.batch_size} {steps:>3} steps: "
                f"{run.wall_s:6.2f} s, {run.peak_rss_mb:6.0f} MiB RSS{gpu}",
                flush=True,
            )
    best = {steps: min(r.wall_s for r in rs) for steps, rs in runs.items()}
    step_ms = slope_ms(best[args.n1], best[args.n2], args.n1, args.n2)
    every = [r for rs in runs.values() for r in rs]
    row = {
        "method": method,
        "resolution": case.resolution,
        "batch_size": case.batch_size,
        "wall_s": {str(steps): [r.wall_s for r in rs] for steps, rs in runs.items()},
        "step_ms": step_ms,
        "peak_rss_mb": max(r.peak_rss_mb for r in every),
        "startup_s": best[args.n1] - args.n1 * step_ms / 1000,
    }
    if any("peak_gpu_mb" in r.metrics for r in every):
        row["peak_gpu_mb"] = max(r.metrics.get("peak_gpu_mb", 0.0) for r in every)
    if warm_up is not None:
        row["cold_compile_run_s"] = warm_up.wall_s
    row["steady_step_ms"] = min(r.metrics["steady_step_ms"] for r in runs[args.n2])
    if method in OURS:
        row["cache_s_reported"] = min(r.metrics["cache_seconds"] for r in runs[args.n2])
    return row


def machine(args: argparse.Namespace) -> dict:
    import diffusers
    import torch

    info = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'res':>5} {'batch':>5} {'method':<13} {'slope ms':>9} {'speedup':>8} {'steady ms':>10} {'speedup':>8} "
        f"{'RSS MiB':>8} {'ratio':>6} {'GPU MiB':>8} {'ratio':>6} {'start-up s':>10}"
    )
    print(header)
    print("-" * len(header))

    def fmt(row: dict, key: str, spec: str, suffix: str = "") -> str:
        return f"{row[key]:{spec}}{suffix}" if row.get(key) is not None else ""

    for row in rows:
        print(
            f"{row['resolution']:>5} {row['batch_size']:>5} {row['method']:<13} {row['step_ms']:>9.1f} "
            f"{fmt(row, 'speedup', '.2f', '×'):>8} {fmt(row, 'steady_step_ms', '.1f'):>10} "
            f"{fmt(row, 'steady_speedup', '.2f', '×'):>8} {row['peak_rss_mb']:>8.0f} {fmt(row, 'rss_ratio', '.2f'):>6} "
            f"{fmt(row, 'peak_gpu_mb', '.0f'):>8} {fmt(row, 'gpu_ratio', '.2f'):>6} {row['startup_s']:>10.2f}"
        )


def prepare_model(args: argparse.Namespace, scratch: Path) -> Path:
    """The model directory both sides load: the tiny SDXL (built fresh), or full-size random SDXL base, built
    into ``--model-dir`` once and reused while its ``model_index.json`` is there."""
    if args.model == "tiny":
        from pipeline.models.tiny_sdxl import build_tiny_sdxl

        model_dir = Path(args.model_dir) if args.model_dir else scratch / "tiny_sdxl"
        if not (model_dir / "model_index.json").is_file():
            build_tiny_sdxl(model_dir)
        return model_dir
    from pipeline.models.random_sdxl import build_random_sdxl

    if not args.model_dir:
        raise SystemExit("--model sdxl-random needs --model-dir (a folder with ~7 GB free; reused across runs).")
    model_dir = Path(args.model_dir)
    if not (model_dir / "model_index.json").is_file():
        print(f"building full-size random SDXL base into {model_dir} ...", flush=True)
        build_random_sdxl(model_dir, device=args.device)
    return model_dir


def run_benchmark(args: argparse.Namespace) -> None:
    script = Path(args.diffusers_script)
    if not script.is_file():
        raise SystemExit(f"--diffusers-script {script} not found: fetch examples/dreambooth/{script.name} first.")
    cases = [Case(resolution, batch) for resolution in args.resolutions for batch in args.batch_sizes]
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        scratch = Path(tmp)
        model_dir = prepare_model(args, scratch)
        rows = []
        for case in cases:
            theirs = measure(args, "diffusers", model_dir, case, scratch)
            rows.append(theirs)
            for method in ("ours", OURS_COMPILED) if args.compile else ("ours",):
                ours = measure(args, method, model_dir, case, scratch)
                ours["speedup"] = theirs["step_ms"] / ours["step_ms"]
                ours["steady_speedup"] = theirs["steady_step_ms"] / ours["steady_step_ms"]
                ours["rss_ratio"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
                if "peak_gpu_mb" in ours and "peak_gpu_mb" in theirs:
                    ours["gpu_ratio"] = ours["peak_gpu_mb"] / theirs["peak_gpu_mb"]
                rows.append(ours)
    print_table(rows)
    results = Path(args.results) if args.results else RESULTS_DIR / f"train_{args.device}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": f"train_{args.device}",
        "command": " ".join(sys.argv),
        "diffusers_script": str(script),
        "settings": {
            "model": args.model,
            "device": args.device,
            "mixed_precision": args.mixed_precision,
            "compile": args.compile,
            "gradient_checkpointing": args.gradient_checkpointing,
            "n1": args.n1,
            "n2": args.n2,
            "repeats": args.repeats,
            "rank": RANK,
            "alpha": RANK,
            "lr": LR,
            "prompt": PROMPT,
            "images": str(
                Path(args.images).relative_to(_REPO) if Path(args.images).is_relative_to(_REPO) else args.images
            ),
        },
        "machine": machine(args),
        "rows": rows,
    }
    results.write_text(json.dumps(payload, indent=2))
    print(f"wrote {results}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-script", default="/tmp/train_dreambooth_lora_sdxl.py")
    parser.add_argument("--model", choices=["tiny", "sdxl-random"], default="tiny")
    parser.add_argument("--model-dir", help="model folder to reuse (built there first if it holds no model)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: no on cpu, bf16 on cuda")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--compile", action="store_true", help="also measure ours with compile_unet=True")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both sides")
    parser.add_argument("--n1", type=int, default=5, help="steps of the short run")
    parser.add_argument("--n2", type=int, default=25, help="steps of the long run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides")
    parser.add_argument("--images", default=str(IMAGES))
    parser.add_argument("--results", help="results JSON (default benchmarks/results/train_<device>.json)")
    # Internal: one run in a subprocess.
    parser.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    parser.add_argument("script_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    if args.n2 <= args.n1:
        parser.error("--n2 must be larger than --n1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "ours":
        run_ours_worker(args)
    elif args.worker == "diffusers":
        run_diffusers_worker(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
