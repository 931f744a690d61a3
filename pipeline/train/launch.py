"""Multi-process LoRA training through ``accelerate launch``: the command, and a trainer ``run_lora`` can use.

``distributed_trainer(settings, model)`` returns a callable with ``train_lora``'s signature. It writes a job
file, launches ``pipeline.train.worker`` on every rank (each loads its own copy of the base model and runs
``train_lora`` under DDP), then loads the adapter rank 0 wrote into the caller's ``pipe`` so export and
validation images run in-process exactly as after an in-process ``train_lora``.

On CPU, ``accelerate launch --cpu`` starts a single process (multi-CPU needs MPI), so several processes are
always launched with ``--multi_gpu`` (torchrun underneath); without CUDA, ``Accelerator(cpu=True)`` in the
training loop then picks gloo. ``--cpu`` is used only for one CPU process.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.lora.adapters import LoraSpec
from pipeline.lora.training import ADAPTER_NAME, add_fresh_lora, cpu_copy, load_trainable_state
from pipeline.models.base_model import BaseModelSpec
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainingSample
from pipeline.train.loop import LogCallback, TrainResult

WORKER_MODULE = "pipeline.train.worker"
LOG_PREFIX = "castlora-log "
"""Stdout lines of the main rank starting with this carry one ``on_log(step, metrics)`` call as JSON."""
ERROR_PREFIX = "castlora-error: "
"""Stderr line a worker prints for a user-facing CastloraError, so the parent can show that message first."""
ADAPTER_FILE = "adapter.safetensors"
"""Every trained LoRA tensor by ``<component>.<parameter name>`` (loaded back into the parent's pipe)."""
LORA_STATE_FILE = "lora_state.safetensors"
"""``TrainResult.lora_state`` of rank 0 (diffusers naming)."""
RESULT_FILE = "result.json"
"""The other TrainResult fields; written last, so its presence means the rank-0 outputs are complete."""
TAIL_LINES = 60
MAX_LINE = 2000
"""Characters kept of one output line (the tails are bounded in lines and in characters)."""


@dataclass(frozen=True)
class LaunchSettings:
    num_processes: int = 1
    accelerate_config_file: str = ""
    """Optional accelerate config yaml (``accelerate config``); the flags set here override its values."""
    main_process_port: int = 0
    """Rendezvous port on 127.0.0.1; 0 picks a free one when the command is built."""
    use_cpu: bool | None = None
    """None: CPU (gloo) when CUDA is unavailable. True forces CPU even on a GPU machine."""

    def cpu(self) -> bool:
        return (not torch.cuda.is_available()) if self.use_cpu is None else self.use_cpu


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate_settings(settings: LaunchSettings, gpu_count: int | None = None) -> None:
    """Clear errors before anything starts; ``gpu_count`` None asks torch."""
    if settings.num_processes < 1:
        raise CastloraError(
            f"num_processes={settings.num_processes} (ModelResource.train_processes / CASTLORA_TRAIN_PROCESSES) "
            "must be >= 1."
        )
    if not settings.cpu():
        available = torch.cuda.device_count() if gpu_count is None else gpu_count
        if settings.num_processes > available:
            raise CastloraError(
                f"num_processes={settings.num_processes} (ModelResource.train_processes / "
                f"CASTLORA_TRAIN_PROCESSES) is more than the {available} visible CUDA GPU(s): lower it to at most "
                f"{available}, or train on CPU."
            )
    if settings.accelerate_config_file and not Path(settings.accelerate_config_file).expanduser().is_file():
        raise CastloraError(
            f"accelerate_config_file {settings.accelerate_config_file} (ModelResource.accelerate_config_file) "
            "does not exist: point it at a yaml written by `accelerate config`, or leave it empty."
        )
    if not 0 <= settings.main_process_port < 65536:
        raise CastloraError(
            f"main_process_port={settings.main_process_port} must be in [0, 65535] (0 = pick a free one)."
        )


def launch_command(settings: LaunchSettings, job_file: Path, gpu_count: int | None = None) -> list[str]:
    """``python -m accelerate.commands.launch … -m pipeline.train.worker <job_file>`` for ``settings``."""
    validate_settings(settings, gpu_count)
    port = settings.main_process_port or _free_port()
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if settings.accelerate_config_file:
        command += ["--config_file", str(Path(settings.accelerate_config_file).expanduser())]
    if settings.num_processes > 1:
        command.append("--multi_gpu")  # torchrun-style processes; on CPU the loop's Accelerator picks gloo
    elif settings.cpu():
        command.append("--cpu")
    command += [
        "--num_processes", str(settings.num_processes),
        "--num_machines", "1",
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port),
    ]  # fmt: skip
    if not settings.accelerate_config_file:
        # TrainConfig.mixed_precision is passed to the Accelerator itself; these only silence launch's defaults.
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*command, "-m", WORKER_MODULE, str(job_file)]


def launch_env(settings: LaunchSettings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: the repository importable, CUDA hidden when CPU is forced."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if settings.cpu() and settings.use_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores; launch would otherwise pick per-rank threads
    return env


# ----------------------------------------------------------------------------------------------- running


def _model_spec(model: BaseModelSpec | str | Path) -> BaseModelSpec:
    return model if isinstance(model, BaseModelSpec) else BaseModelSpec(source=str(model))


def write_job(
    job_dir: Path,
    model: BaseModelSpec,
    model_cache: Path,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    out_dir: Path,
    cache_dir: Path,
    base_model_id: str | None,
    init_lora: dict[str, torch.Tensor] | None,
) -> Path:
    """The job file every rank reads (and the init LoRA beside it); results go to ``job_dir/result``."""
    init_file = None
    if init_lora is not None:
        init_file = job_dir / "init_lora.safetensors"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in init_lora.items()}, str(init_file))
    job = {
        "model": dataclasses.asdict(model),
        "model_cache": str(model_cache),
        "samples": [dataclasses.asdict(s) for s in samples],
        "config": {**dataclasses.asdict(config), "targets": list(config.targets)},
        "out_dir": str(out_dir),
        "cache_dir": str(cache_dir),
        "base_model_id": base_model_id,
        "init_lora": str(init_file) if init_file else None,
        "result_dir": str(job_dir / "result"),
    }
    job_file = job_dir / "job.json"
    job_file.write_text(json.dumps(job, indent=2))
    return job_file


def _failure(command: list[str], returncode: int, stderr: Sequence[str], stdout: Sequence[str]) -> CastloraError:
    reported = [line[len(ERROR_PREFIX) :] for line in stderr if line.startswith(ERROR_PREFIX)]
    headline = reported[-1] if reported else f"the training processes exited with status {returncode}"
    if "world_size" in headline:
        headline += " (world_size is ModelResource.train_processes / CASTLORA_TRAIN_PROCESSES)"
    tail = "\n".join(stderr[-TAIL_LINES:]) or "\n".join(stdout[-TAIL_LINES:]) or "(no output)"
    return CastloraError(
        f"Distributed LoRA training failed: {headline}\nCommand: {' '.join(command)}\nLast output lines:\n{tail}"
    )


def _stop_group(process: subprocess.Popen) -> None:
    """End the launcher and every rank it started (they share its process group)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_launch(command: list[str], env: dict[str, str], on_log: LogCallback | None) -> None:
    """Run ``command`` in its own process group; relay rank 0's log lines; raise with the output tail on failure."""
    stderr: collections.deque[str] = collections.deque(maxlen=400)
    stdout: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    reader = threading.Thread(
        target=lambda: stderr.extend(line.rstrip("\n")[:MAX_LINE] for line in process.stderr), daemon=True
    )
    reader.start()
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(LOG_PREFIX):
                if on_log is not None:
                    entry = json.loads(line[len(LOG_PREFIX) :])
                    on_log(int(entry["step"]), entry["metrics"])
            else:
                stdout.append(line[:MAX_LINE])
        returncode = process.wait()
        reader.join(timeout=10)
    finally:
        _stop_group(process)  # the caller was interrupted (or a log callback raised): take the ranks down too
    if returncode != 0:
        raise _failure(command, returncode, list(stderr), list(stdout))


@contextmanager
def _parked(pipe: Any) -> Iterator[None]:
    """Move the caller's pipe off the GPU while the ranks train on it, and back afterwards."""
    modules = {
        name: module for name, module in getattr(pipe, "components", {}).items() if isinstance(module, torch.nn.Module)
    }
    devices = {name: param.device for name, module in modules.items() for param in list(module.parameters())[:1]}
    on_gpu = any(device.type == "cuda" for device in devices.values())
    if on_gpu:
        for name in devices:
            modules[name].to("cpu")
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if on_gpu:
            for name, device in devices.items():
                modules[name].to(device)


def load_result(pipe: Any, config: TrainConfig, result_dir: Path) -> TrainResult:
    """Put rank 0's adapter on ``pipe`` as ``train_lora`` leaves it, and rebuild its TrainResult."""
    result_file = result_dir / RESULT_FILE
    if not result_file.is_file():
        raise CastloraError(
            f"Distributed LoRA training ended without rank 0's results ({result_file} is missing); see the "
            "training log for the worker's output."
        )
    fields = json.loads(result_file.read_text())
    adapter = load_file(str(result_dir / ADAPTER_FILE))
    family = family_for(pipe)
    models = family.lora_components(pipe, config.train_text_encoder)
    spec = LoraSpec(rank=config.rank, alpha=config.alpha, target_modules=tuple(config.targets))
    for component, model in models.items():
        add_fresh_lora(family, component, model, spec, config.seed)
        model.eval()
    load_trainable_state(models, adapter, result_dir)
    return TrainResult(
        steps_done=int(fields["steps_done"]),
        final_loss=fields["final_loss"],
        losses=[(int(step), float(loss), float(lr)) for step, loss, lr in fields["losses"]],
        lora_state=load_file(str(result_dir / LORA_STATE_FILE)),
        resumed_from=fields["resumed_from"],
        text_encoder_lora_states={
            name: cpu_copy(family.lora_state_dict(name, model, ADAPTER_NAME))
            for name, model in models.items()
            if name != family.denoiser
        },
        metrics=fields["metrics"],
    )


def distributed_trainer(
    settings: LaunchSettings,
    model: BaseModelSpec | str | Path,
    model_cache: Path | None = None,
    work_dir: Path | None = None,
) -> Callable[..., TrainResult]:
    """A ``train_lora`` replacement that trains on ``settings.num_processes`` processes.

    ``model`` is what every rank loads: a BaseModelSpec (its device is replaced by the rank's own) or a local
    diffusers directory; ``model_cache`` is where ``tiny:`` models and hub ids resolve (default: the job dir).
    The job file and rank 0's results go to a temporary folder under ``cache_dir``, removed afterwards, or to
    ``work_dir`` (kept, for inspection) when given.
    """
    validate_settings(settings)
    spec = _model_spec(model)

    def train(
        pipe: Any,
        samples: Sequence[TrainingSample],
        config: TrainConfig,
        out_dir: Path,
        cache_dir: Path,
        on_log: LogCallback | None = None,
        base_model_id: str | None = None,
        init_lora: dict[str, torch.Tensor] | None = None,
    ) -> TrainResult:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
            return _train_in(
                Path(work_dir), pipe, samples, config, out_dir, cache_dir, on_log, base_model_id, init_lora
            )
        with tempfile.TemporaryDirectory(prefix="launch-", dir=cache_dir) as temporary:
            return _train_in(
                Path(temporary), pipe, samples, config, out_dir, cache_dir, on_log, base_model_id, init_lora
            )

    def _train_in(job_dir: Path, pipe, samples, config, out_dir, cache_dir, on_log, base_model_id, init_lora):
        shutil.rmtree(job_dir / "result", ignore_errors=True)  # a kept work_dir must not offer an old run's result
        job_file = write_job(
            job_dir, spec, Path(model_cache or job_dir), samples, config, Path(out_dir), Path(cache_dir),
            base_model_id, init_lora,
        )  # fmt: skip
        command = launch_command(settings, job_file)
        with _parked(pipe):
            run_launch(command, launch_env(settings), on_log)
        return load_result(pipe, config, job_dir / "result")

    return train


__all__ = [
    "LaunchSettings",
    "distributed_trainer",
    "launch_command",
    "launch_env",
    "validate_settings",
]
