"""Training-step time and memory: castlora's ``train_lora`` vs diffusers' ``train_dreambooth_lora_sdxl.py`` (SDXL
models) or ``train_dreambooth_lora_flux.py`` (FLUX.1 models; ``--model tiny-flux``, ``wide-flux``, ``flux-random``).

Run from the repository root (the diffusers script is *not* part of this repository; pass its path):

    # CPU, tiny SDXL (default): fp32, one torch thread per side
    python -m benchmarks.bench_train --diffusers-script /path/to/train_dreambooth_lora_sdxl.py
    # CPU, tiny FLUX.1 and a wider (compute-bound) FLUX.1 transformer
    python -m benchmarks.bench_train --model tiny-flux wide-flux --resolutions 256 \
        --diffusers-script /path/to/train_dreambooth_lora_flux.py
    # GPU, full-size SDXL base with random weights (built once into --model-dir, ~7 GB), bf16, 1024 px
    python -m benchmarks.bench_train --device cuda --model sdxl-random --model-dir /scratch/sdxl-random \
        --resolutions 1024 --batch-sizes 1 4 --diffusers-script /path/to/train_dreambooth_lora_sdxl.py

Both sides train a rank-4 LoRA of the denoiser with the same photos, prompt, resolution, batch size, lr 1e-4
(constant), precision, no prior preservation, no validation and the same torch thread count; on FLUX.1 also the
same LoRA targets (attention of both streams, no feed-forward), guidance 1.0, uniform σ and T5 sequence length.
Runs alternate between the methods, so load drifts on a shared machine hit both. Every run is its own
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


@dataclass(frozen=True)
class Model:
    """A model both sides train: its family (which diffusers script is the baseline) and how it is built."""

    family: str
    full_size: bool = False
    """Full-size random weights: built once into ``--model-dir`` and reused (GPU benchmarks)."""
    transformer: dict | None = None
    """For tiny FLUX.1 models: ``tiny_transformer_config`` options (None = the ``tiny-flux`` preset's shape)."""


MODELS = {
    "tiny": Model("sdxl"),
    "sdxl-random": Model("sdxl", full_size=True),
    "tiny-flux": Model("flux"),
    # Same text encoders, VAE and tokenizers as tiny-flux; a 9.2M-parameter transformer (width 256, 2 double- and 4
    # single-stream blocks) whose step is matrix products, not per-op overhead.
    "wide-flux": Model("flux", transformer={"double_blocks": 2, "single_blocks": 4, "heads": 4, "head_dim": 64}),
    "flux-random": Model("flux", full_size=True),
}
FLUX_ATTENTION_TARGETS = "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj"
FLUX_ATTENTION_TARGETS += ",attn.to_add_out"
"""``--lora_layers`` for the FLUX script: castlora's default targets (attention of both streams). The script's own
default adds the double blocks' feed-forward layers, which castlora trains only when asked."""


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
    from diffusers import DiffusionPipeline

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
    # On CPU both sides train in fp32. On CUDA the diffusers scripts load fp32 weights and cast the frozen ones to the
    # training precision; castlora's models resource loads half precision on CUDA, so this does too (a full-size
    # FLUX.1 in fp32 is 68 GB, which would only measure this wrapper).
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    pipe = DiffusionPipeline.from_pretrained(args.model_dir, dtype=dtype if args.device == "cuda" else torch.float32)
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
    load_1m: float
    """The machine's 1-minute load average when the run started (other jobs on a shared machine)."""


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


def _diffusers_family_args(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """Settings the SDXL and FLUX.1 scripts spell differently, or that only the FLUX.1 one has."""
    if MODELS[args.model].family != "flux":
        return []
    from transformers import AutoTokenizer

    # castlora encodes min(512, the T5 tokenizer's model_max_length) tokens; the script pads to --max_sequence_length.
    t5_tokens = min(512, AutoTokenizer.from_pretrained(model_dir / "tokenizer_2").model_max_length)
    return [
        "--lora_alpha",
        str(RANK),
        "--lora_layers",
        FLUX_ATTENTION_TARGETS,
        "--guidance_scale",
        "1.0",
        "--weighting_scheme",
        "none",
        "--max_sequence_length",
        str(t5_tokens),
        "--cache_latents",
    ]


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
            "--device",
            args.device,
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
        # "all" = every tracker installed (none here): the default, tensorboard, is not a dependency of castlora.
        "--report_to",
        "all",
        *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
        *_diffusers_family_args(args, model_dir),
    ]
    return [*common, "--diffusers-script", str(args.diffusers_script), "--", *script_args]


def run_once(args: argparse.Namespace, method: str, model_dir: Path, steps: int, case: Case, scratch: Path) -> Run:
    # A fresh folder per run: no resume, no cache carried over.
    work = Path(tempfile.mkdtemp(prefix=f"{method}-{case.resolution}-b{case.batch_size}-{steps}-", dir=scratch))
    load = os.getloadavg()[0]
    wall, rss = spawn(_worker_command(args, method, model_dir, steps, case, work), args.threads, work / "log.txt")
    return Run(wall, rss, json.loads((work / "metrics.json").read_text()), load)


def slope_ms(short: float, long: float, n1: int, n2: int) -> float:
    return (long - short) / (n2 - n1) * 1000


def measure(args: argparse.Namespace, methods: list[str], model_dir: Path, case: Case, scratch: Path) -> list[dict]:
    """Best-of-``repeats`` wall time at n1 and n2 steps for every method. Runs alternate between the methods (and the
    two lengths) within each repeat, so load drifts on a shared machine hit all of them alike."""
    runs: dict[str, dict[int, list[Run]]] = {method: {args.n1: [], args.n2: []} for method in methods}
    warm_ups: dict[str, Run] = {}
    if OURS_COMPILED in methods:
        # Fills inductor's on-disk cache, so every measured run pays the same (cached) compile.
        warm_ups[OURS_COMPILED] = run_once(args, OURS_COMPILED, model_dir, args.n1, case, scratch)
        print(f"  {OURS_COMPILED} {case.resolution:>4}px b{case.batch_size} compile warm-up: "
              f"{warm_ups[OURS_COMPILED].wall_s:6.2f} s")  # fmt: skip
    for _ in range(args.repeats):
        for steps in (args.n1, args.n2):
            for method in methods:
                run = run_once(args, method, model_dir, steps, case, scratch)
                runs[method][steps].append(run)
                gpu = f", {run.metrics['peak_gpu_mb']:7.0f} MiB GPU" if "peak_gpu_mb" in run.metrics else ""
                print(
                    f"  {method:<12} {case.resolution:>4}px b{case.batch_size} {steps:>3} steps: "
                    f"{run.wall_s:6.2f} s, {run.peak_rss_mb:6.0f} MiB RSS{gpu}, "
                    f"steady {run.metrics['steady_step_ms'] or 0:7.1f} ms, load {run.load_1m:.2f}",
                    flush=True,
                )
    return [summarise(args, method, case, runs[method], warm_ups.get(method)) for method in methods]


def summarise(args: argparse.Namespace, method: str, case: Case, runs: dict[int, list[Run]], warm_up: Run | None):
    best = {steps: min(r.wall_s for r in rs) for steps, rs in runs.items()}
    step_ms = slope_ms(best[args.n1], best[args.n2], args.n1, args.n2)
    every = [r for rs in runs.values() for r in rs]
    row = {
        "method": method,
        "model": args.model,
        "resolution": case.resolution,
        "batch_size": case.batch_size,
        "wall_s": {str(steps): [r.wall_s for r in rs] for steps, rs in runs.items()},
        "step_ms": step_ms,
        "peak_rss_mb": max(r.peak_rss_mb for r in every),
        "startup_s": best[args.n1] - args.n1 * step_ms / 1000,
        "load_average_1m": [min(r.load_1m for r in every), max(r.load_1m for r in every)],
    }
    if any("peak_gpu_mb" in r.metrics for r in every):
        row["peak_gpu_mb"] = max(r.metrics.get("peak_gpu_mb", 0.0) for r in every)
    if warm_up is not None:
        row["cold_compile_run_s"] = warm_up.wall_s
    row["steady_step_ms_each"] = [r.metrics["steady_step_ms"] for r in runs[args.n2]]
    row["steady_step_ms"] = min(row["steady_step_ms_each"])
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
        f"{'model':<11} {'res':>5} {'batch':>5} {'method':<13} {'slope ms':>9} {'speedup':>8} {'steady ms':>10} "
        f"{'speedup':>8} "
        f"{'RSS MiB':>8} {'ratio':>6} {'GPU MiB':>8} {'ratio':>6} {'start-up s':>10}"
    )
    print(header)
    print("-" * len(header))

    def fmt(row: dict, key: str, spec: str, suffix: str = "") -> str:
        return f"{row[key]:{spec}}{suffix}" if row.get(key) is not None else ""

    for row in rows:
        print(
            f"{row['model']:<11} {row['resolution']:>5} {row['batch_size']:>5} {row['method']:<13} "
            f"{row['step_ms']:>9.1f} "
            f"{fmt(row, 'speedup', '.2f', '×'):>8} {fmt(row, 'steady_step_ms', '.1f'):>10} "
            f"{fmt(row, 'steady_speedup', '.2f', '×'):>8} {row['peak_rss_mb']:>8.0f} {fmt(row, 'rss_ratio', '.2f'):>6} "
            f"{fmt(row, 'peak_gpu_mb', '.0f'):>8} {fmt(row, 'gpu_ratio', '.2f'):>6} {row['startup_s']:>10.2f}"
        )


def prepare_model(args: argparse.Namespace, scratch: Path) -> Path:
    """The model directory both sides load: a tiny model (built fresh into the scratch folder unless
    ``--model-dir`` holds one), or a full-size random SDXL base / FLUX.1-dev, built into ``--model-dir`` once and
    reused while its ``model_index.json`` is there."""
    model = MODELS[args.model]
    if model.full_size and not args.model_dir:
        raise SystemExit(
            f"--model {args.model} needs --model-dir (a folder with room for the full-size model: ~7 GB for SDXL, "
            "~34 GB for FLUX.1 in bf16; reused across runs)."
        )
    model_dir = Path(args.model_dir) if args.model_dir else scratch / args.model
    if (model_dir / "model_index.json").is_file():
        return model_dir
    print(f"building {args.model} into {model_dir} ...", flush=True)
    if args.model == "tiny":
        from pipeline.models.tiny_sdxl import build_tiny_sdxl

        build_tiny_sdxl(model_dir)
    elif args.model == "sdxl-random":
        from pipeline.models.random_sdxl import build_random_sdxl

        build_random_sdxl(model_dir, device=args.device)
    elif args.model == "flux-random":
        from pipeline.models.random_flux import build_random_flux

        build_random_flux(model_dir, device=args.device)
    else:
        from pipeline.models.tiny_flux import build_tiny_flux, tiny_transformer_config

        shape = tiny_transformer_config(**model.transformer) if model.transformer else None
        build_tiny_flux(model_dir, transformer_config=shape)
    return model_dir


def run_benchmark(args: argparse.Namespace) -> None:
    script = Path(args.diffusers_script)
    if not script.is_file():
        raise SystemExit(f"--diffusers-script {script} not found: fetch examples/dreambooth/{script.name} first.")
    cases = [Case(resolution, batch) for resolution in args.resolutions for batch in args.batch_sizes]
    methods = ["diffusers", "ours", *([OURS_COMPILED] if args.compile else [])]
    family = MODELS[args.model].family
    name = f"train_{args.device}" if family == "sdxl" else f"train_{family}_{args.device}"
    results = Path(args.results) if args.results else RESULTS_DIR / f"{name}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        scratch = Path(tmp)
        for model in args.models:
            model_args = argparse.Namespace(**{**vars(args), "model": model})
            model_dir = prepare_model(model_args, scratch)
            for case in cases:
                theirs, *ours_rows = measure(model_args, methods, model_dir, case, scratch)
                rows.append(theirs)
                for ours in ours_rows:
                    ours["speedup"] = theirs["step_ms"] / ours["step_ms"]
                    ours["steady_speedup"] = theirs["steady_step_ms"] / ours["steady_step_ms"]
                    ours["rss_ratio"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
                    if "peak_gpu_mb" in ours and "peak_gpu_mb" in theirs:
                        ours["gpu_ratio"] = ours["peak_gpu_mb"] / theirs["peak_gpu_mb"]
                    rows.append(ours)
                # Written after every case, so an interrupted run keeps what it measured.
                write_results(args, results, name, script, rows)
    print_table(rows)
    print(f"wrote {results}")


def write_results(args: argparse.Namespace, results: Path, name: str, script: Path, rows: list[dict]) -> None:
    payload = {
        "benchmark": name,
        "command": " ".join(["python -m benchmarks.bench_train", *sys.argv[1:]]),
        "diffusers_script": str(script),
        "settings": {
            "models": args.models,
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--diffusers-script", help="default: /tmp/train_dreambooth_lora_sdxl.py, or ..._flux.py for FLUX.1 models"
    )
    parser.add_argument(
        "--model", nargs="+", choices=sorted(MODELS), default=["tiny"], help="one or more models of one family"
    )
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
    parser.add_argument(
        "--results", help="results JSON (default benchmarks/results/train_<device>.json, train_flux_<device>.json)"
    )
    # Internal: one run in a subprocess.
    parser.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    parser.add_argument("script_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = args.model
    args.model = args.models[0]
    if len({MODELS[model].family for model in args.models}) > 1:
        parser.error("--model: models of one family per run (one diffusers script is the baseline)")
    if args.model_dir and len(args.models) > 1:
        parser.error("--model-dir holds one model: name a single --model with it")
    if args.diffusers_script is None:
        args.diffusers_script = f"/tmp/train_dreambooth_lora_{MODELS[args.model].family}.py"
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
