"""DDPM noising with an epsilon or v-prediction target: the training objective of the U-Net families
(docs/design.md#model-families)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler

from pipeline.errors import CastloraError


class DDPMObjective:
    """``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` at a uniformly drawn integer timestep; the target is ε or v, as the
    pipeline's scheduler config says (``prediction_type``)."""

    def __init__(self, scheduler_config: Any):
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise CastloraError(
                f"Scheduler prediction_type {self.prediction_type!r} is not supported; use epsilon or v_prediction."
            )

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (count,), generator=generator)

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)
