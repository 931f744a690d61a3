"""Merge character LoRAs into one LoRA (modular customization, docs/design.md#modular-customization).

Every method works module by module on the characters' weight updates ``Δᵢ = sᵢ · alphaᵢ/rᵢ · Bᵢ Aᵢ`` (``sᵢ`` the
character's ``lora_scale``) and returns plain LoRA modules with the scales folded into ``up`` and
``alpha = rank`` (scale 1), so every loader applies them the same way:

* ``concat``: ranks stacked, ``A = [A₁; A₂]``, ``B = [s₁B₁ s₂B₂]``: exactly ``Δ₁ + Δ₂`` at rank r₁ + r₂. It is
  also what loading both LoRAs together does (the "naive merge").
* ``sum``: the same sum ``Δ₁ + Δ₂``, stored at the characters' own rank (the largest rᵢ) by truncated SVD, the
  best rank-r approximation of the sum. The sum of two rank-r updates has rank up to 2r, so ``sum`` is exact only
  when the updates share their subspaces; it trades that loss for a file of the usual size.
* ``gradient_fusion`` (Mix-of-Show): per linear layer, the weight that best reproduces each character's layer
  outputs on that character's own input features: minimise ``Σᵢ ‖(W₀ + Δᵢ) Xᵢ − (W₀ + Δ) Xᵢ‖²`` over Δ. With the
  Gram matrices ``Gᵢ = Xᵢ Xᵢᵀ`` (captured with forward hooks while the character's own LoRA runs its prompts
  through the denoiser at a few timesteps) the closed form is ``Δ = (Σᵢ Δᵢ Gᵢ)(Σᵢ Gᵢ + λI)⁻¹``; the small ridge λ
  (relative to the mean eigenvalue) pulls the delta, not the base weight, towards zero where no feature reaches.
  The fused delta is stored as a LoRA by truncated SVD at ``rank`` (default r₁ + r₂, where the truncation loss is
  measured and recorded). Conv layers (no token features) fall back to the exact sum.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.lora.adapters import LoraError, remove_adapter
from pipeline.lora.character_lora import CharacterLora, LoraModule, attach_lora_modules

MERGE_METHODS = ("sum", "concat", "gradient_fusion")
CAPTURE_ADAPTER = "castlora_capture"


@dataclass(frozen=True)
class MergedLora:
    method: str
    modules: dict[str, LoraModule]
    sources: tuple[dict[str, Any], ...]
    details: dict[str, Any] = field(default_factory=dict)
    """Method-specific numbers (fusion residuals, SVD energy kept)."""

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def metadata(self) -> dict[str, str]:
        """What the exported files' headers record: method and sources (path, sha256, format, rank, alpha, scale)."""
        return {
            "castlora_merge_method": self.method,
            "castlora_merge_sources": json.dumps(list(self.sources), sort_keys=True),
            "castlora_merge_details": json.dumps(self.details, sort_keys=True, default=float),
        }


def _all_modules(loras: Sequence[CharacterLora]) -> list[str]:
    if len(loras) < 2:
        raise LoraError(f"Merging needs at least two character LoRAs, got {len(loras)}.")
    return sorted(set().union(*(lora.modules for lora in loras)))


def _kernel(loras: Sequence[CharacterLora], name: str) -> tuple[int, ...]:
    module = next(lora.modules[name] for lora in loras if name in lora.modules)
    return tuple(module.down.shape[2:])


def _as_module(down: torch.Tensor, up: torch.Tensor, kernel: tuple[int, ...]) -> LoraModule:
    rank = down.shape[0]
    down = down.reshape(rank, -1, *kernel) if kernel else down
    up = up.reshape(up.shape[0], rank, *((1, 1) if kernel else ())) if kernel else up
    return LoraModule(down.contiguous(), up.contiguous(), float(rank))


def delta_to_lora(delta: torch.Tensor, rank: int, kernel: tuple[int, ...] = ()) -> tuple[LoraModule, float]:
    """The best rank-``rank`` LoRA of ``delta`` (out, in·kh·kw) by truncated SVD (``up = U√S``, ``down = √S Vᵀ``),
    and the fraction of the delta's squared Frobenius norm it keeps."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    total = float((s**2).sum())
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    return _as_module((root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float(), kernel), kept


def concat_merge(loras: Sequence[CharacterLora]) -> MergedLora:
    """Ranks stacked with the scales folded into ``up``: exactly the sum of the characters' deltas."""
    modules = {}
    for name in _all_modules(loras):
        downs, ups = [], []
        for lora in loras:
            module = lora.modules.get(name)
            if module is None:
                continue
            downs.append(module.down.float().reshape(module.rank, -1))
            ups.append(module.up.float().reshape(module.up.shape[0], module.rank) * (lora.scale * module.scale))
        modules[name] = _as_module(torch.cat(downs, 0), torch.cat(ups, 1), _kernel(loras, name))
    return MergedLora("concat", modules, tuple(lora.describe() for lora in loras))


def summed_deltas(loras: Sequence[CharacterLora]) -> dict[str, torch.Tensor]:
    """Σᵢ Δᵢ per module (a module missing from a LoRA contributes nothing)."""
    total: dict[str, torch.Tensor] = {}
    for lora in loras:
        for name, delta in lora.deltas().items():
            total[name] = total[name] + delta if name in total else delta
    return total


def sum_merge(loras: Sequence[CharacterLora], rank: int | None = None) -> MergedLora:
    """Σᵢ Δᵢ stored at ``rank`` (default: the largest source rank) by truncated SVD."""
    _all_modules(loras)
    rank = rank or max(lora.rank for lora in loras)
    modules, kept = {}, []
    for name, delta in summed_deltas(loras).items():
        modules[name], fraction = delta_to_lora(delta, rank, _kernel(loras, name))
        kept.append(fraction)
    details = {"rank": rank, "min_energy_kept": min(kept), "mean_energy_kept": sum(kept) / len(kept)}
    return MergedLora("sum", modules, tuple(lora.describe() for lora in loras), details)


def fused_deltas(
    loras: Sequence[CharacterLora], grams: Sequence[Mapping[str, torch.Tensor]], ridge: float = 1e-4
) -> dict[str, torch.Tensor]:
    """Mix-of-Show's least-squares fusion per module: ``Δ = (Σᵢ Δᵢ Gᵢ)(Σᵢ Gᵢ + λI)⁻¹`` with
    ``λ = ridge · tr(ΣGᵢ)/n``; modules without features (conv layers) get the plain sum."""
    if len(grams) != len(loras):
        raise LoraError(f"Gradient fusion needs one set of features per LoRA ({len(loras)}), got {len(grams)}.")
    fused: dict[str, torch.Tensor] = {}
    own = [lora.deltas() for lora in loras]
    for name, plain_sum in summed_deltas(loras).items():
        if any(name not in g for g in grams):
            fused[name] = plain_sum
            continue
        gram_total = sum(g[name].double() for g in grams)
        target = sum(
            deltas.get(name, torch.zeros_like(plain_sum)).double() @ g[name].double()
            for deltas, g in zip(own, grams, strict=True)
        )
        size = gram_total.shape[0]
        damping = ridge * float(torch.trace(gram_total)) / size + 1e-12
        system = gram_total + damping * torch.eye(size, dtype=torch.float64)
        # Δ·S = T with S symmetric  ⇔  S·Δᵀ = Tᵀ
        fused[name] = torch.linalg.solve(system, target.T).T.float()
    return fused


def fusion_residuals(
    merged: Mapping[str, torch.Tensor], loras: Sequence[CharacterLora], grams: Sequence[Mapping[str, torch.Tensor]]
) -> list[float]:
    """Per character: Σ over layers of ``‖(Δ − Δᵢ) Xᵢ‖² = tr((Δ − Δᵢ) Gᵢ (Δ − Δᵢ)ᵀ)``, how far the merged layers'
    outputs are from the character's own LoRA on its own features (what gradient fusion minimises in sum)."""
    residuals = []
    for lora, gram in zip(loras, grams, strict=True):
        total = 0.0
        own = lora.deltas()
        for name, g in gram.items():
            difference = merged[name].double() - own.get(name, torch.zeros_like(merged[name])).double()
            total += float(torch.einsum("oi,ij,oj->", difference, g.double(), difference))
        residuals.append(total)
    return residuals


def gradient_fusion_merge(
    loras: Sequence[CharacterLora],
    grams: Sequence[Mapping[str, torch.Tensor]],
    rank: int | None = None,
    ridge: float = 1e-4,
) -> MergedLora:
    """The fused deltas (``fused_deltas``) stored at ``rank`` (default Σ source ranks) by truncated SVD; the
    details record each character's residual for the fused LoRA as stored and for the plain sum."""
    rank = rank or sum(lora.rank for lora in loras)
    modules, kept = {}, []
    for name, delta in fused_deltas(loras, grams, ridge).items():
        modules[name], fraction = delta_to_lora(delta, rank, _kernel(loras, name))
        kept.append(fraction)
    stored = {name: module.delta() for name, module in modules.items()}
    details = {
        "rank": rank,
        "ridge": ridge,
        "min_energy_kept": min(kept),
        "residual_fused": fusion_residuals(stored, loras, grams),
        "residual_sum": fusion_residuals(summed_deltas(loras), loras, grams),
        "feature_layers": len(grams[0]),
    }
    return MergedLora("gradient_fusion", modules, tuple(lora.describe() for lora in loras), details)


@torch.no_grad()
def capture_grams(
    denoiser: torch.nn.Module,
    lora: CharacterLora,
    run_denoiser: Callable[[], None],
) -> dict[str, torch.Tensor]:
    """``Gᵢ = Σ x xᵀ`` of the inputs of every linear layer ``lora`` adapts, while ``lora`` alone is active on
    ``denoiser`` and ``run_denoiser()`` runs the character's prompts through it (forward hooks). The adapter is
    removed again afterwards."""
    attach_lora_modules(denoiser, lora.modules, CAPTURE_ADAPTER, lora.scale)
    grams: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            features = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().cpu()
            gram = features.T @ features
            grams[name] = grams[name] + gram if name in grams else gram

        return hook

    try:
        for name, module in lora.modules.items():
            if module.down.dim() == 2:  # linear layers only: conv inputs are not token features
                handles.append(denoiser.get_submodule(name).register_forward_pre_hook(hook_for(name)))
        run_denoiser()
    finally:
        for handle in handles:
            handle.remove()
        remove_adapter(denoiser, CAPTURE_ADAPTER)
    return grams


def merge(
    method: str,
    loras: Sequence[CharacterLora],
    grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
    rank: int | None = None,
    ridge: float = 1e-4,
) -> MergedLora:
    """Dispatch on ``method`` (one of ``MERGE_METHODS``)."""
    if method == "concat":
        return concat_merge(loras)
    if method == "sum":
        return sum_merge(loras, rank)
    if method == "gradient_fusion":
        if grams is None:
            raise LoraError("gradient_fusion needs each character's captured features (capture_grams).")
        return gradient_fusion_merge(loras, grams, rank, ridge)
    raise LoraError(f"Unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}.")
