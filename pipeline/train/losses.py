"""The training losses, on per-sample prediction errors: plain (masked) MSE, DCO, MuDI's KL anchor and
Diffusion-DPO. They see predictions and targets only, whatever the model family or its target (ε, v, ε − x0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_error(
    pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None, normalization: str
) -> torch.Tensor:
    """Mean squared error per sample; with ``masks`` (N, 1, h, w), the masked error under ``normalization``."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    dims = tuple(range(1, error.ndim))
    if masks is None:
        return error.mean(dim=dims)
    masked = (error * masks).mean(dim=dims)
    if normalization == "mask_mean":
        masked = masked / masks.expand_as(error).mean(dim=dims).clamp_min(1e-6)
    return masked


def dco_loss(model_error: torch.Tensor, reference_error: torch.Tensor, beta: float) -> torch.Tensor:
    """DCO: -log σ(-β (‖ε_θ − ε‖² − ‖ε_ref − ε‖²)), per sample then averaged; 0-gradient-free at init."""
    return -F.logsigmoid(-beta * (model_error - reference_error)).mean()


def kl_to_reference(pred: torch.Tensor, reference_pred: torch.Tensor) -> torch.Tensor:
    """MuDI's KL regulariser towards the previous round's model: mean over samples of the mean squared
    difference between the two models' predictions at the same noisy input.

    Each model's denoising posterior p(x_{t-1} | x_t) is a Gaussian with the same fixed variance σ_t² and a
    mean that is affine in the predicted noise, μ = (x_t − β_t/√(1−ᾱ_t) ε̂)/√α_t, so
    KL(p_θ ‖ p_ref) = ‖μ_θ − μ_ref‖² / (2σ_t²) ∝ ‖ε_θ − ε_ref‖²; the t-dependent weight is dropped, as the
    simple DDPM loss drops it (with v-prediction, v differences are ε differences times a per-t factor).
    """
    error = F.mse_loss(pred.float(), reference_pred.float(), reduction="none")
    return error.mean(dim=tuple(range(1, error.ndim))).mean()


def diffusion_dpo_loss(
    model_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO loss and per-pair margins from per-sample errors laid out (winners…, losers…).

    margin = −β/2 · [(m_w − r_w) − (m_l − r_l)]: positive when the model lowers the winner's error relative
    to the reference more than the loser's. Loss = mean(−log σ(margin)); log 2 when model == reference.
    """
    model_w, model_l = model_errors.float().chunk(2)
    ref_w, ref_l = reference_errors.float().chunk(2)
    margins = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return -F.logsigmoid(margins).mean(), margins


def implicit_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the model prefers the winner more than the reference does (ties count half)."""
    return (margins > 0).float().mean() + 0.5 * (margins == 0).float().mean()
