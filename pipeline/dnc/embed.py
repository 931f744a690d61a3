"""Image embedders for Detect-and-Compare and the evaluation metrics, behind one interface (docs/design.md#embedders).

Every embedder returns ``(n, d)`` float32 rows, L2-normalised, so a dot product is a cosine similarity.

- ``dinov2``: DINOv2, mean of ``last_hidden_state`` over all tokens (CLS included), as MuDI's D&C-DINO.
- ``clip``: CLIP's projected image embedding (CLIP-I).
- ``dreamsim_style``: the L2-normalised DINOv2 and CLIP embeddings concatenated and renormalised, so its cosine
  is the mean of the two cosines. It is a DreamSim-*style* ensemble only: real DreamSim fine-tunes its backbones
  on human similarity judgements and its weights are not available here. Never report it as DreamSim.

A metric whose model is missing is reported unavailable with the reason (``load_embedders``), never replaced by
another model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.images import to_rgb
from pipeline.models.inputs import index_chunks
from pipeline.models.loading import TINY_PREFIX, load_pretrained, resolve_model
from pipeline.segment.owl_sam import _require_existing_dir, _require_model_type

EMBEDDER_NAMES = ("dinov2", "clip", "dreamsim_style")
DREAMSIM_STYLE = "dreamsim_style"
DREAMSIM_STYLE_DESCRIPTION = (
    "DreamSim-style ensemble: concat(L2(DINOv2 mean token), L2(CLIP image)), renormalised; not DreamSim"
)
# Which base models each embedder needs, in concatenation order.
REQUIRED_BASES: dict[str, tuple[str, ...]] = {
    "dinov2": ("dinov2",),
    "clip": ("clip",),
    DREAMSIM_STYLE: ("dinov2", "clip"),
}


@runtime_checkable
class Embedder(Protocol):
    name: str
    model_id: str

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(len(images), d)`` float32, rows L2-normalised."""
        ...


def normalize_rows(features: torch.Tensor, what: str) -> np.ndarray:
    """float32 numpy rows of unit length; a zero or non-finite row is an error, not a silent NaN."""
    features = features.float()
    norms = features.norm(dim=-1, keepdim=True)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise CastloraError(f"{what} produced a zero or non-finite embedding; check the model weights and dtype.")
    return (features / norms).cpu().numpy().astype(np.float32)


def _check_local_model(source: str, model_type: str, what: str) -> None:
    _require_existing_dir(source, what)
    _require_model_type(source, model_type, what)


class _BatchedImageEmbedder:
    """Shared batching: preprocess and run ``_features`` on ``batch_size`` images at a time."""

    name: str
    model_id: str
    dim: int

    def __init__(
        self,
        source: str,
        model_type: str,
        what: str,
        processor_cls: Any,
        model_cls: Any,
        name: str,
        device: str,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        """Check ``source`` holds a ``model_type`` model, then load its processor and model onto ``device``."""
        _check_local_model(source, model_type, what)
        self.name = name
        self.model_id = str(source)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))
        self.processor = load_pretrained(processor_cls.from_pretrained, source, what)
        self.model = load_pretrained(model_cls.from_pretrained, source, what, dtype=dtype)
        self.model.to(self.device).eval()

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        rgb = [to_rgb(image) for image in images]
        if not rgb:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = []
        for batch in index_chunks(len(rgb), self.batch_size):
            pixels = self._pixel_values([rgb[i] for i in batch]).to(self.device, self.dtype)
            rows.append(normalize_rows(self._features(pixels), self.name))
        return np.concatenate(rows, axis=0)


class Dinov2Embedder(_BatchedImageEmbedder):
    """DINOv2 (``facebook/dinov2-base`` or a saved dir): mean of ``last_hidden_state`` over tokens, as MuDI."""

    def __init__(
        self,
        source: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: str = "dinov2",
    ) -> None:
        from transformers import AutoImageProcessor, Dinov2Model

        super().__init__(
            source, "dinov2", "DINOv2 embedder", AutoImageProcessor, Dinov2Model, name, device, dtype, batch_size
        )
        self.dim = int(self.model.config.hidden_size)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state.mean(dim=1)


class ClipImageEmbedder(_BatchedImageEmbedder):
    """CLIP's projected image embedding (``image_embeds``), the CLIP-I metric's features."""

    def __init__(
        self,
        source: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: str = "clip",
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        super().__init__(source, "clip", "CLIP embedder", CLIPProcessor, CLIPModel, name, device, dtype, batch_size)
        self.dim = int(self.model.config.projection_dim)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The towers and projections directly: the output type of get_image_features changed across versions.
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return self.model.visual_projection(pooled)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Projected, L2-normalised text embeddings (truncated to the text tower's length, as CLIP-T does)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = []
        for batch in index_chunks(len(texts), self.batch_size):
            tokens = self.processor.tokenizer(
                [texts[i] for i in batch], padding=True, truncation=True, return_tensors="pt"
            )
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ).pooler_output
            rows.append(normalize_rows(self.model.text_projection(pooled), f"{self.name} text tower"))
        return np.concatenate(rows, axis=0)


class EnsembleEmbedder:
    """Concatenation of the members' L2-normalised embeddings, renormalised (each member weighs the same)."""

    def __init__(self, name: str, members: Sequence[Embedder], description: str = "") -> None:
        if not members:
            raise CastloraError(f"Ensemble embedder {name!r} needs at least one member.")
        self.name = name
        self.members = tuple(members)
        self.description = description
        self.model_id = "+".join(f"{member.name}={member.model_id}" for member in self.members)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        parts = [member.embed(images) for member in self.members]
        joined = np.concatenate(parts, axis=1) / np.sqrt(len(parts))
        # Each part already has unit rows, so this is unit length up to rounding; renormalise anyway.
        return normalize_rows(torch.from_numpy(joined), self.name)


class ClipTextImageScorer:
    """CLIP-T: cosine between CLIP's projected image and text embeddings (raw cosine, not ×100 or clipped)."""

    def __init__(self, clip: ClipImageEmbedder) -> None:
        self.clip = clip
        self.model_id = clip.model_id

    def text_image_similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """``(len(images), len(texts))`` cosine matrix; the per-image prompt score is its diagonal."""
        return self.clip.embed(images) @ self.clip.embed_texts(texts).T

    def paired_similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Cosine of image i with text i (CLIP-T per generated image and its prompt)."""
        if len(images) != len(texts):
            raise CastloraError(f"CLIP-T pairs images with prompts: got {len(images)} images, {len(texts)} texts.")
        image_rows, text_rows = self.clip.embed(images), self.clip.embed_texts(texts)
        return np.einsum("nd,nd->n", image_rows, text_rows)


# --- loading ---------------------------------------------------------------------------------------------

_BASE_BUILDERS: dict[str, Callable[..., _BatchedImageEmbedder]] = {
    "dinov2": Dinov2Embedder,
    "clip": ClipImageEmbedder,
}


def _hub_id_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # a malformed repo id (HFValidationError) is simply not in the cache
        return False
    return isinstance(found, str)


def locate_model(reference: str, cache_root: Path, what: str) -> tuple[str | None, str | None]:
    """``(loadable source, None)`` or ``(None, why it is unavailable)``.

    Unavailable means *absent*: no source configured, a local directory that does not exist, or a hub id that is
    not in the local Hugging Face cache (castlora never downloads). A model that is present but wrong (another
    model type, a folder without config.json) raises ModelLoadError: that is a configuration error to fix.
    """
    reference = (reference or "").strip()
    if not reference:
        return None, f"{what}: no model configured (empty source); set it in the model preset to enable this metric."
    if reference.startswith(TINY_PREFIX):
        return resolve_model(reference, cache_root, what), None
    path = Path(reference).expanduser()
    if reference.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.is_dir():
            return None, f"{what}: model directory {path} does not exist."
        return resolve_model(reference, cache_root, what), None
    if not _hub_id_cached(reference):
        return None, (
            f"{what}: hub id {reference!r} is not in the local Hugging Face cache (castlora does not download); "
            "download it on a connected machine or point the preset at a saved directory."
        )
    return reference, None


def load_embedders(
    names: Sequence[str],
    sources: dict[str, str],
    cache_root: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> tuple[dict[str, Embedder], dict[str, str]]:
    """Load the requested embedders; return ``(available by name, reason by unavailable name)``.

    ``sources`` maps base model names (``"dinov2"``, ``"clip"``) to a preset reference (hub id, directory,
    ``tiny:<name>`` or ``""``). Each base model loads once and is shared (``dreamsim_style`` reuses both).
    """
    unknown = [name for name in names if name not in REQUIRED_BASES]
    if unknown:
        raise CastloraError(f"Unknown embedder(s) {unknown}; choose from {list(EMBEDDER_NAMES)}.")
    bases: dict[str, _BatchedImageEmbedder] = {}
    base_reasons: dict[str, str] = {}
    for base in dict.fromkeys(b for name in names for b in REQUIRED_BASES[name]):
        what = f"{base} embedder"
        source, reason = locate_model(sources.get(base, ""), Path(cache_root), what)
        if source is None:
            base_reasons[base] = reason or f"{what}: unavailable"
            continue
        bases[base] = _BASE_BUILDERS[base](source, device=device, dtype=dtype, batch_size=batch_size)

    available: dict[str, Embedder] = {}
    unavailable: dict[str, str] = {}
    for name in dict.fromkeys(names):
        missing = [base for base in REQUIRED_BASES[name] if base not in bases]
        if missing:
            reasons = "; ".join(base_reasons[base] for base in missing)
            unavailable[name] = reasons if name != DREAMSIM_STYLE else f"{name} needs {missing}: {reasons}"
            continue
        if name == DREAMSIM_STYLE:
            members = [bases[base] for base in REQUIRED_BASES[name]]
            available[name] = EnsembleEmbedder(name, members, DREAMSIM_STYLE_DESCRIPTION)
        else:
            available[name] = bases[name]
    return available, unavailable


def load_clip_text_scorer(
    source: str,
    cache_root: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    shared: Any = None,
) -> tuple[ClipTextImageScorer | None, str | None]:
    """CLIP-T scorer, reusing an already loaded ``ClipImageEmbedder`` (``shared``) when given."""
    if isinstance(shared, ClipImageEmbedder):
        return ClipTextImageScorer(shared), None
    located, reason = locate_model(source, Path(cache_root), "CLIP-T scorer")
    if located is None:
        return None, reason
    return ClipTextImageScorer(ClipImageEmbedder(located, device=device, dtype=dtype, batch_size=batch_size)), None
