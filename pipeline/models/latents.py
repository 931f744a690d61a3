"""The one map between VAE latents and the latents a diffusion model sees, for training and inference alike.

A VAE config says how its raw latents ``z`` are normalised for the denoiser, in one of two diffusers conventions:

- ``latents_mean`` / ``latents_std`` (per channel) with ``scaling_factor``: ``(z − mean) · scale / std``. The
  SDXL pipeline decodes with exactly the inverse when the config has both, so they take precedence.
- ``shift_factor`` with ``scaling_factor`` (SD3, FLUX): ``(z − shift) · scale``; no shift (SDXL's own VAE) is
  plain ``z · scale``. (The SDXL pipeline's decode knows no shift; the shifted VAEs are FLUX/SD3 ones, whose
  16-channel latents an SDXL U-Net cannot take anyway.)

The training latent cache and MuDI's initial latent both go through ``encode_to_model_latents``, so a model
trains on exactly the latents its inference starts from.
"""

from __future__ import annotations

from typing import Any

import torch


def _channel_stats(config: Any, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    view = (1, latents.shape[1]) + (1,) * (latents.ndim - 2)
    return tuple(torch.tensor(v, device=latents.device, dtype=torch.float32).view(view) for v in (mean, std))


def to_model_latents(config: Any, raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (N, C, h, w) → the denoiser's latents, in float32."""
    raw = raw.float()
    stats = _channel_stats(config, raw)
    if stats is not None:
        mean, std = stats
        return (raw - mean) * config.scaling_factor / std
    shift = getattr(config, "shift_factor", None) or 0.0
    return (raw - shift) * config.scaling_factor


def from_model_latents(config: Any, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_model_latents``: what ``vae.decode`` takes."""
    latents = latents.float()
    stats = _channel_stats(config, latents)
    if stats is not None:
        mean, std = stats
        return latents * std / config.scaling_factor + mean
    shift = getattr(config, "shift_factor", None) or 0.0
    return latents / config.scaling_factor + shift


@torch.no_grad()
def encode_to_model_latents(
    vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Model latents (float32, on ``device``) of ``pixels`` (N, 3, H, W) in [-1, 1]: the posterior's mean,
    normalised by ``to_model_latents``.

    The VAE runs in float32 (SDXL's overflows in float16) and is put back in its dtype afterwards. ``device``
    defaults to the VAE's; pass the pipeline's execution device when the VAE may be offloaded.
    """
    if device is None:
        device = next(vae.parameters()).device
    original_dtype = vae.dtype
    if original_dtype != torch.float32:
        vae.to(torch.float32)
    try:
        raw = vae.encode(pixels.to(device, torch.float32)).latent_dist.mean
    finally:
        if original_dtype != torch.float32:
            vae.to(original_dtype)
    return to_model_latents(vae.config, raw)
