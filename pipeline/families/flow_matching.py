"""Rectified-flow noising with a velocity target: the training objective of the flow-matching families
(docs/design.md#flux1).

As diffusers' ``train_dreambooth_lora_flux.py``: a density draws u ∈ [0, 1); the timestep is the scheduler's
``timesteps[int(u · N)]`` (σ · N on its training grid, so a static ``shift`` in a scheduler config without dynamic
shifting is applied; FLUX.1-dev's config shifts dynamically, at inference only); ``x_σ = (1 − σ)·x0 + σ·ε`` and
the target is ``ε − x0``. The family passes the denoiser ``timestep / 1000`` (= σ), as the pipeline does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipeline.errors import CastloraError

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")


class FlowMatchingObjective:
    """σ drawn by ``weighting`` (``uniform``, the reference script's default ``none``; ``logit_normal`` with
    ``logit_mean``/``logit_std``; ``mode`` with ``mode_scale``), all from the caller's generator only."""

    def __init__(
        self,
        scheduler_config: Any,
        weighting: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ):
        if weighting not in WEIGHTING_SCHEMES:
            raise CastloraError(f"Unknown σ weighting {weighting!r}; choose one of {list(WEIGHTING_SCHEMES)}.")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.weighting = weighting
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)

    def density(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """u ∈ [0, 1) per sample (diffusers' ``compute_density_for_timestep_sampling``, seeded)."""
        if self.weighting == "logit_normal":
            normal = torch.randn(count, generator=generator) * self.logit_std + self.logit_mean
            return torch.sigmoid(normal)
        u = torch.rand(count, generator=generator)
        if self.weighting == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        indices = (self.density(count, generator) * self.num_train_timesteps).long()
        indices = indices.clamp(0, self.num_train_timesteps - 1)
        return self.scheduler.timesteps[indices].float()

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ of each timestep (``timesteps = σ · N`` on the scheduler's grid)."""
        return timesteps.float() / self.num_train_timesteps

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigmas(timesteps).to(latents.device).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigma) * latents.float() + sigma * noise.float()
        return noisy, noise.float() - latents.float()
