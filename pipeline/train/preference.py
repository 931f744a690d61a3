"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization").

An optional IdGlow-style preference step after a training round: given (winner, loser) images generated
from the same prompt, make the LoRA prefer the winner more than the reference model (the starting LoRA,
``init_lora``) does. It is a ``pipeline.train.trainer.Trainer`` subclass, so it reuses ``train_lora``'s caches,
checkpoints, resume and DDP handling; only the batch plan (pairs), the noise (shared within a pair) and the loss
differ.

Conventions follow the authors' code (and diffusers' research example): errors are per-element means over
the latent, both images of a pair get the same noise and timestep, and
loss = −log σ(−β/2 · [(‖ε_w−ε_θ(x_w)‖² − ‖ε_w−ε_ref(x_w)‖²) − (‖ε_l−ε_θ(x_l)‖² − ‖ε_l−ε_ref(x_l)‖²)]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CastloraError
from pipeline.lora.training import ADAPTER_NAME, REFERENCE_ADAPTER
from pipeline.storage.hashing import sha256_json
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainingSample
from pipeline.train.loop import LogCallback, TrainResult, fingerprint_fields, run_trainer
from pipeline.train.losses import diffusion_dpo_loss, implicit_accuracy, per_sample_error
from pipeline.train.runtime import check_mixed_precision, make_accelerator, step_seed
from pipeline.train.trainer import Batch, Trainer

PreferencePair = tuple[TrainingSample, TrainingSample]
"""(winner, loser): two different images generated from the same prompt."""

_EVAL_SEED = 0xE7A1


def check_pairs(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The pairs sorted by sample ids (so the plan ignores input order), after checking each is usable."""
    if not pairs:
        raise CastloraError("No preference pairs to train on: pass at least one (winner, loser) pair.")
    for index, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(s, TrainingSample) for s in pair):
            raise CastloraError(f"Preference pair {index} must be a (winner, loser) tuple of TrainingSample.")
        winner, loser = pair
        if winner.prompt != loser.prompt:
            raise CastloraError(
                f"Preference pair {index}: winner {winner.image_path} has prompt {winner.prompt!r} but loser "
                f"{loser.image_path} has {loser.prompt!r}; Diffusion-DPO compares images of the same prompt, "
                "so pair only images generated from one prompt."
            )
        if winner.sample_id == loser.sample_id:
            raise CastloraError(
                f"Preference pair {index}: winner and loser are the same image ({winner.image_path}); drop the pair."
            )
    return sorted(pairs, key=lambda pair: (pair[0].sample_id, pair[1].sample_id))


def check_preference_config(config: TrainConfig) -> None:
    """Refuse settings ``train_preference`` cannot train with, naming each field to change."""
    problems = []
    if config.dpo_beta <= 0:
        problems.append("set dpo_beta > 0 (paper: 5000 for SD1.5; 2500-5000 for SDXL)")
    if config.prior_weight > 0:
        problems.append("set prior_weight=0 (no prior preservation: the reference model already anchors DPO)")
    if config.dco_beta > 0 or config.kl_weight > 0:
        problems.append("set dco_beta=0 and kl_weight=0 (DPO's β is its own regulariser)")
    if config.train_text_encoder:
        problems.append("set train_text_encoder=False (only the U-Net LoRA is preference-tuned)")
    if problems:
        raise CastloraError("Invalid config for train_preference: " + "; ".join(problems) + ".")


class PreferenceTrainer(Trainer):
    """``Trainer`` with pairs as the data: each step draws ``batch_size`` pairs (winners then losers)."""

    needs_caches_when_done = True  # final_metrics scores every pair

    def __init__(self, pipe, pairs: list[PreferencePair], config: TrainConfig, accelerator, init_lora):
        self.pairs = pairs
        super().__init__(pipe, [s for pair in pairs for s in pair], config, accelerator, init_lora)
        # The reference is the starting LoRA when there is one, else the base U-Net (LoRA off), which a fresh
        # adapter (B = 0) equals at step 0.
        self.reference_adapter = REFERENCE_ADAPTER if init_lora is not None else None

    def training_samples(self, samples: Sequence[TrainingSample]) -> list[TrainingSample]:
        return sorted({s.sample_id: s for s in samples}.values(), key=lambda s: s.sample_id)

    def select(self, step: int) -> tuple[list[TrainingSample], int]:
        size = self.config.batch_size
        rng = np.random.default_rng([self.config.seed, step, 0xD90])
        picks = rng.integers(len(self.pairs), size=size * self.world)[self.rank * size : (self.rank + 1) * size]
        chosen = [self.pairs[i] for i in picks]
        return [w for w, _ in chosen] + [loser for _, loser in chosen], len(chosen)

    def draw(self, step: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._paired_noise(torch.Generator().manual_seed(step_seed(self.config.seed, step, self.rank)), batch)

    def _paired_noise(self, generator: torch.Generator, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The same noise and timestep for the winner and the loser of each pair."""
        n = batch.n_instance
        noise = torch.randn(batch.latents[:n].shape, generator=generator).repeat(2, 1, 1, 1)
        timesteps = self.objective.draw_timesteps(n, generator).repeat(2)
        return noise.to(self.device), timesteps.to(self.device)

    def _errors(self, batch: Batch, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return per_sample_error(pred, target, batch.masks, self.config.mask_normalization)

    def loss(self, step: int, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = self.inputs(batch, *self.draw(step, batch))
        reference = self.frozen_pred(inputs, self.reference_adapter)  # before the graph: it flips requires_grad
        model_errors = self._errors(batch, self.predict(inputs), inputs.target)
        reference_errors = self._errors(batch, reference, inputs.target)
        loss, margins = diffusion_dpo_loss(model_errors, reference_errors, self.config.dpo_beta)
        n = batch.n_instance
        parts = {
            "winner_mse": model_errors[:n].detach().mean(),
            "loser_mse": model_errors[n:].detach().mean(),
            "reference_mse": reference_errors.mean(),
            "implicit_acc": implicit_accuracy(margins.detach()),
        }
        return loss, parts

    @torch.no_grad()
    def final_metrics(self) -> dict[str, Any]:
        """DPO loss and implicit accuracy over every training pair at fixed noise and timesteps."""
        generator = torch.Generator().manual_seed(self.config.seed + _EVAL_SEED)
        margins, losses = [], []
        size = self.config.batch_size
        for start in range(0, len(self.pairs), size):
            chunk = self.pairs[start : start + size]
            batch = self.assemble([w for w, _ in chunk] + [loser for _, loser in chunk], len(chunk))
            inputs = self.inputs(batch, *self._paired_noise(generator, batch))
            model_errors = self._errors(batch, self.frozen_pred(inputs, ADAPTER_NAME), inputs.target)
            reference_errors = self._errors(batch, self.frozen_pred(inputs, self.reference_adapter), inputs.target)
            loss, chunk_margins = diffusion_dpo_loss(model_errors, reference_errors, self.config.dpo_beta)
            margins.append(chunk_margins)
            losses.append(loss * len(chunk))
        all_margins = torch.cat(margins)
        return {
            "implicit_accuracy": float(implicit_accuracy(all_margins)),
            "dpo_eval_loss": float(torch.stack(losses).sum() / len(self.pairs)),
            "preference_pairs": len(self.pairs),
        }


def train_preference(
    pipe,
    pairs: Sequence[PreferencePair],
    config: TrainConfig,
    out_dir: Path,
    cache_dir: Path,
    init_lora: dict[str, torch.Tensor] | None,
    on_log: LogCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_model_id: str | None = None,
) -> TrainResult:
    """Diffusion-DPO on ``pairs`` for ``config.steps`` steps of ``config.batch_size`` pairs per process.

    The LoRA starts from ``init_lora`` (round k-1's ``TrainResult.lora_state``), which is also the frozen
    reference; with None it starts fresh and the reference is the base U-Net. Checkpoints, resume,
    ``on_log`` / ``should_stop`` and the returned U-Net state behave as in ``train_lora``. Logged parts:
    ``winner_mse``, ``loser_mse``, ``reference_mse``, ``implicit_acc``; ``metrics`` adds ``implicit_accuracy``
    and ``dpo_eval_loss`` over all pairs at fixed noise (0.5 and log 2 for an untrained model).
    """
    pairs = check_pairs(pairs)
    check_preference_config(config)
    check_mixed_precision(config)
    accelerator = make_accelerator(config)
    fields = fingerprint_fields(pipe, [], config, accelerator.num_processes, base_model_id, init_lora, preference=True)
    fields["samples"] = sha256_json([[w.sample_id, loser.sample_id, w.prompt] for w, loser in pairs])
    fields["objective"] = "diffusion_dpo"  # a DPO checkpoint never resumes a plain run, nor the reverse
    trainer = PreferenceTrainer(pipe, pairs, config, accelerator, init_lora)
    return run_trainer(trainer, fields, Path(out_dir), Path(cache_dir), on_log, should_stop)
