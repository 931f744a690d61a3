"""The resumable, checkpointing step loop and ``train_lora``, the DreamBooth-LoRA entry point (MuDI setting),
DDP-ready under accelerate.

Order of work: plan samples → build content-keyed caches (latents, prompt embeddings) → move the encoders
off the accelerator → add LoRA → resume from the newest checkpoint if any → train, checkpointing every
``checkpoint_every`` steps; the encoders go back where they were however the run ends. What a step computes
is the ``Trainer``'s (``pipeline.train.trainer``); what depends on the base model is its family's
(docs/design.md#model-families).

Continuing from an earlier LoRA (``init_lora``, e.g. the previous round of MuDI's iterative training) starts
the trainable adapter from those weights (denoiser, and the text encoders when it has a text-encoder LoRA);
with ``kl_weight`` > 0 a second, frozen copy of them (the adapter named ``reference``) anchors the model: the
earlier model whole, its text encoders included. The reference adapters are removed again when ``train_lora``
ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.lora.training import ADAPTER_NAME, cpu_copy, lora_state_hash
from pipeline.storage.hashing import sha256_json
from pipeline.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainingSample, samples_fingerprint_items
from pipeline.train.runtime import (
    agree,
    check_mixed_precision,
    make_accelerator,
    mean_over_ranks,
    peak_memory_mb,
    placement_restored,
)
from pipeline.train.trainer import Trainer

LogCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float | None
    losses: list[tuple[int, float, float]]
    """(step, loss averaged over processes, learning rate) for every step, including those before a resume."""
    lora_state: dict[str, torch.Tensor]
    """The denoiser's LoRA in the family's file naming (SDXL: ``unet_lora_state_dict``, ``unet.`` prefix)."""
    resumed_from: int | None
    text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Text encoder name (``text_encoder`` / ``text_encoder_2``) -> its LoRA state, when ``train_text_encoder``."""
    metrics: dict[str, Any] = field(default_factory=dict)


def fingerprint_fields(
    pipe: Any,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    world_size: int,
    base_model_id: str | None,
    init_lora: dict[str, torch.Tensor] | None = None,
    preference: bool = False,
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: settings that change the weights, data, base model and
    starting LoRA (the ``init_lora`` key exists only when one is given, so older checkpoints still match).
    ``preference``: the Diffusion-DPO objective, the only one ``dpo_beta`` acts in."""
    used = [s for s in samples if config.prior_preservation or not s.is_prior]
    fields = {
        "config": config.identity_fields(preference),
        "samples": sha256_json(samples_fingerprint_items(used)),
        "base_model": base_model_id or str(getattr(pipe, "name_or_path", "") or ""),
        **family_for(pipe).identity(pipe),
        "world_size": world_size,
    }
    if init_lora is not None:
        fields["init_lora"] = lora_state_hash(init_lora)
    return fields


def train_lora(
    pipe: Any,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    out_dir: Path,
    cache_dir: Path,
    on_log: LogCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_model_id: str | None = None,
    init_lora: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train (or resume training) a LoRA on ``pipe``'s denoiser; checkpoints go to ``out_dir/checkpoints``.

    Resumes automatically from the newest checkpoint in ``out_dir`` (raising CheckpointError if it is
    corrupt or from another setup). ``on_log(step, metrics)`` runs on the main process every
    ``log_every`` steps; ``should_stop()`` is polled after each step, and a stop writes a checkpoint first.
    ``init_lora`` (a ``TrainResult.lora_state``, or an exported diffusers file's tensors, which may add
    ``text_encoder.``/``text_encoder_2.`` parts; same rank and targets as ``config``) is the adapters' starting
    point instead of fresh ones; its hash joins the checkpoint fingerprint. With ``config.kl_weight`` > 0 it is
    also the frozen reference of the KL term (logged as ``kl``), text encoders included.
    On return the denoiser carries the trained adapter (active), so ``pipe`` can render validation images.
    """
    if config.kl_weight > 0 and init_lora is None:
        raise CastloraError(
            f"kl_weight={config.kl_weight} regularises towards a previous model, but no init_lora was given: "
            "pass the previous round's LoRA state as init_lora, or set kl_weight=0."
        )
    check_mixed_precision(config)
    accelerator = make_accelerator(config)
    fields = fingerprint_fields(pipe, samples, config, accelerator.num_processes, base_model_id, init_lora)
    trainer = Trainer(pipe, samples, config, accelerator, init_lora)
    return run_trainer(trainer, fields, Path(out_dir), Path(cache_dir), on_log, should_stop)


def run_trainer(
    trainer: Trainer,
    fields: dict[str, Any],
    out_dir: Path,
    cache_dir: Path,
    on_log: LogCallback | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    """The resumable, checkpointing step loop shared by every objective (``trainer.loss`` decides which).

    The VAE and text encoders are back on their devices when this returns or raises."""
    pipe, config, accelerator, family = trainer.pipe, trainer.config, trainer.accelerator, trainer.family
    resume = load_latest_checkpoint(out_dir, fields)
    start = resume[0].step if resume else 0
    step_times: list[float] = []
    with placement_restored(family.frozen_encoders(pipe)):
        try:
            started = time.perf_counter()
            if start < config.steps or trainer.needs_caches_when_done:
                trainer.build_caches(cache_dir)
                trainer.offload_encoders()
            cache_seconds = time.perf_counter() - started
            trainer.setup_models()
            losses: list[tuple[int, float, float]] = []
            if resume:
                trainer.resume(*resume)
                losses = [entry for entry in resume[0].losses if entry[0] <= start]
            trainer.prepare()
            if resume and resume[0].scaler is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(resume[0].scaler)

            last_saved = start if resume else None
            done = start
            window: list[float] = []
            accumulation = config.gradient_accumulation_steps
            for step in range(start, config.steps):
                tick = time.perf_counter()
                lr = float(trainer.lr_scheduler.get_last_lr()[0])
                micro_losses, micro_parts = [], []
                for micro in range(accumulation):
                    index = step * accumulation + micro  # micro-batch index: the plan and noise are keyed by it
                    loss, micro_part = trainer.loss(index, trainer.batch(index))
                    trainer.backward(loss, last=micro == accumulation - 1)
                    micro_losses.append(loss.detach())
                    micro_parts.append(micro_part)
                trainer.optimize()
                loss = torch.stack(micro_losses).mean()
                parts = {k: torch.stack([p[k] for p in micro_parts]).float().mean() for k in micro_parts[0]}
                done = step + 1
                loss_value = mean_over_ranks(accelerator, loss)
                losses.append((done, loss_value, lr))
                window.append(loss_value)
                step_times.append(time.perf_counter() - tick)
                if (
                    on_log is not None
                    and accelerator.is_main_process
                    and (done % config.log_every == 0 or done == config.steps)
                ):
                    metrics = {"loss": float(np.mean(window)), "lr": lr, "step_time_s": step_times[-1]}
                    on_log(done, {**metrics, **{k: float(v) for k, v in parts.items()}})
                    window = []
                stop = agree(accelerator, bool(should_stop and accelerator.is_main_process and should_stop()))
                if done % config.checkpoint_every == 0 or done == config.steps or stop:
                    _save(trainer, out_dir, done, losses, fields)
                    last_saved = done
                if stop:
                    break
            if last_saved != done:
                _save(trainer, out_dir, done, losses, fields)
            final_metrics = trainer.final_metrics()
        finally:
            trainer.remove_reference()
            for model in trainer.models.values():
                model.eval()

    denoiser = accelerator.unwrap_model(trainer.denoiser)
    timed = step_times[1:] or step_times  # the first step pays one-off warm-up costs
    metrics = {
        **trainer.cache_stats,
        "cache_seconds": cache_seconds,
        "mean_step_s": float(np.mean(timed)) if timed else None,
        "steps_this_run": len(step_times),
        "mask_normalization": config.mask_normalization if config.masked_loss else None,
        "world_size": accelerator.num_processes,
        "checkpoints": [str(p) for _, p in list_checkpoints(out_dir)],
        **final_metrics,
        **peak_memory_mb(accelerator.device),
    }
    return TrainResult(
        steps_done=done,
        final_loss=losses[-1][1] if losses else None,
        losses=losses,
        lora_state=cpu_copy(family.lora_state_dict(family.denoiser, denoiser, ADAPTER_NAME)),
        resumed_from=start if resume else None,
        text_encoder_lora_states={
            name: cpu_copy(family.lora_state_dict(name, model, ADAPTER_NAME))
            for name, model in trainer.models.items()
            if name != family.denoiser
        },
        metrics=metrics,
    )


def _save(trainer: Trainer, out_dir: Path, step: int, losses, fields: dict[str, Any]) -> None:
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out_dir, trainer.state(step, losses), fields, trainer.config.keep_checkpoints)
    accelerator.wait_for_everyone()
