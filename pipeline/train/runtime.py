"""What a training run runs on: the accelerator and its precision, the optimiser and learning-rate schedule,
torch.compile, per-step seeds, where the frozen encoders sit, and memory bookkeeping. Nothing here knows the
model family or the objective."""

from __future__ import annotations

import gc
import os
import resource
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from pipeline.errors import CastloraError
from pipeline.models.inputs import module_device
from pipeline.train.config import TrainConfig

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Dtype of the frozen weights per ``mixed_precision`` (on CUDA; CPU runs keep float32)."""

COMPILE_BACKEND = "inductor"
"""torch.compile backend for ``compile_unet``; tests use ``aot_eager`` (same graph capture, no C++ build)."""


def check_mixed_precision(config: TrainConfig) -> None:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise CastloraError("mixed_precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on CPU.")


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for ``config``. accelerate keeps one process-wide state and refuses a second
    mixed-precision setting; a single process (tests, notebooks, a code location training twice) may
    safely reset it, a distributed one may not."""
    from accelerate.state import AcceleratorState, PartialState

    # cpu=True without CUDA lets accelerate pick gloo DDP under torchrun / `accelerate launch` on CPU machines.
    kwargs = {"mixed_precision": config.mixed_precision, "cpu": not torch.cuda.is_available()}
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise CastloraError(
                f"Cannot switch mixed_precision to {config.mixed_precision!r} inside a distributed run: {exc}"
            ) from exc
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def make_optimizer(param_groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise CastloraError(
                "use_8bit_adam=True needs the 'bitsandbytes' package (pip install bitsandbytes, CUDA only); "
                "install it or set use_8bit_adam=False."
            ) from exc
        return bnb.optim.AdamW8bit(param_groups, lr=config.lr, weight_decay=config.adam_weight_decay)
    # One fused kernel over all LoRA tensors instead of a Python loop over hundreds of small ones: on the tiny
    # model's 272 LoRA tensors (CPU) 1.3 ms per step, vs 4.9 ms with foreach=True and 9.9 ms per tensor.
    return torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.adam_weight_decay, fused=True)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps)


def compiled(module: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
    """``module`` under torch.compile with ``COMPILE_BACKEND``, refusing early where inductor cannot build."""
    if COMPILE_BACKEND == "inductor" and device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "clang++") if shutil.which(c)), None)
        if not compiler or not shutil.which(compiler):
            raise CastloraError(
                "compile_unet=True on CPU needs a C++ compiler (inductor builds C++ kernels) and none was found "
                "(tried $CXX, g++, clang++): install g++ (apt install g++) or set compile_unet=False."
            )
    return torch.compile(module, backend=COMPILE_BACKEND)


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Set explicitly either way, so a pipe reused across runs does not keep an earlier run's choice."""
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers models
        model.enable_gradient_checkpointing() if enabled else model.disable_gradient_checkpointing()
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 naming
        model.activation_checkpointing_enable() if enabled else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable() if enabled else model.gradient_checkpointing_disable()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of micro-batch ``step`` on ``rank``: every random draw of a step comes from it."""
    return int(np.random.SeedSequence([seed, step, rank, 0x5EED]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextmanager
def placement_restored(modules: Mapping[str, torch.nn.Module]) -> Iterator[None]:
    """Put every module back on the device it had on entry, however the block ends (an exception included):
    training moves the frozen encoders around and must not leave the caller's pipeline on the CPU."""
    devices = {name: module_device(module) for name, module in modules.items()}
    try:
        yield
    finally:
        for name, module in modules.items():
            module.to(devices[name])


def free_accelerator_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def average_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average ``params``' gradients over the processes (for modules outside the DDP wrapper)."""
    for param in params:
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")


def agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when the main process says so (e.g. a stop request seen only there)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag and accelerator.is_main_process else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def mean_over_ranks(accelerator: Accelerator, value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="mean")
    return float(value.item())
