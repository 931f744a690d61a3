"""The model-family seam: everything in training and generation that depends on the base model
(docs/design.md#model-families).

The trainer, the caches, MuDI's initial latent and the stages are written against ``ModelFamily``; a family
(SDXL today; a flow-matching DiT such as FLUX.1 next) is one module implementing it, registered by name in
``pipeline.families``. A family is stateless: every method takes the loaded diffusers pipeline (``pipe``) or
one of its components, so the pipeline stays the one object the stages pass around.

Shapes every family agrees on: model latents are (N, C, h, w) on the VAE's grid (a family that packs them for
its denoiser, as FLUX does 2x2 patches, packs inside ``predict`` and ``render``), so masks, MuDI's
``ε + γ·M⊙z`` and the latent cache stay family-free; a prompt encodes to a token sequence (N, L, D) and one
pooled vector per prompt (N, P).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.lora.adapters import LoraSpec
from pipeline.models.base_model import BaseModelSpec
from pipeline.models.identity import module_identity
from pipeline.models.latents import encode_to_model_latents
from pipeline.settings import changed_family_options, family_option_fields


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training image's pixels came from: what size-and-crop conditioning (SDXL's time ids) reads."""

    original_size: tuple[int, int]
    """(height, width) of the source image."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image."""
    target_size: tuple[int, int] | None = None
    """(height, width) the image was brought to: its aspect-ratio bucket (docs/design.md#aspect-ratio-buckets);
    None = the square ``resolution`` x ``resolution``."""


class TrainingObjective(Protocol):
    """How a family noises clean latents and what its denoiser is trained to predict."""

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` training timesteps (CPU), drawn from ``generator`` only."""
        ...

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's input at ``timesteps`` and the regression target (e.g. ε, v, or ε − x0)."""
        ...


@dataclass(frozen=True)
class RenderRequest:
    """One image for ``ModelFamily.render``: everything ``pipeline.infer.generate`` decided."""

    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    steps: int
    guidance_scale: float
    generator: torch.Generator
    lora_scale: float
    initial_latents: torch.Tensor | None
    """Unscaled model latents (1, C, h, w) to start from (MuDI's ``ε + γ·M⊙z``), or None for the pipeline's own
    noise drawn from ``generator``."""


def text_to_image_batch(pipe: Any, requests: Sequence[RenderRequest], **extra: Any) -> list[Image.Image] | None:
    """The requests as one diffusers text-to-image call (one generator per image, ``extra`` passed on), or None when
    they cannot share one: different size, steps, guidance or LoRA scale, initial latents, or negative prompts on
    some but not all. SDXL's batched render; also the call for a pipeline no family claims (a test's stand-in)."""
    negatives = [request.negative_prompt for request in requests]
    shared = {(r.height, r.width, r.steps, r.guidance_scale, r.lora_scale) for r in requests}
    if (
        len(shared) != 1
        or any(request.initial_latents is not None for request in requests)
        or (any(negatives) and not all(negatives))
    ):
        return None
    first = requests[0]
    output = pipe(
        prompt=[request.prompt for request in requests],
        negative_prompt=negatives if all(negatives) else None,
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        generator=[request.generator for request in requests],
        output_type="pil",
        **extra,
    )
    return list(output.images)


class ModelFamily(ABC):
    """One base-model family: loading, prompts, latents, noising, conditioning, LoRA and rendering."""

    name: ClassVar[str]
    """Registry key; ``BaseModelSpec.family`` (from the preset) names it."""
    denoiser: ClassVar[str]
    """Pipeline attribute of the network LoRA always trains (``unet``; ``transformer`` for a DiT)."""
    text_encoders: ClassVar[tuple[str, ...]]
    """Pipeline attributes of the text encoders, in the order the export formats number them."""
    vae: ClassVar[str] = "vae"
    patch_size: ClassVar[int] = 1
    """Latent cells per denoiser token along each side (1 for a U-Net; 2 for FLUX's 2x2 packing)."""

    options: ClassVar[frozenset[str]] = frozenset()
    """The family options (settings fields declared with ``pipeline.settings.family_option``) this family reads; it
    is configured with them by ``with_options`` and refuses any other family option set away from its default
    (docs/design.md#flux1-run-settings)."""

    # -- run settings
    def check_options(self, settings: Any) -> dict[str, Any]:
        """``{field: value}`` of the family options of ``settings`` (a settings dataclass) that this family reads.
        A family option it does not read, set to anything but its default, is refused naming the field."""
        refused = {name: pair for name, pair in changed_family_options(settings).items() if name not in self.options}
        if refused:
            from pipeline.families import FAMILIES  # the registry imports this module

            problems = []
            for name, (value, default) in refused.items():
                readers = sorted(family.name for family in FAMILIES.values() if name in family.options)
                problems.append(
                    f"{type(settings).__name__}.{name}={value!r} is read only by the model famil"
                    f"{'y' if len(readers) == 1 else 'ies'} {', '.join(readers) or '(none registered)'}: leave it at "
                    f"{default!r}"
                )
            raise CastloraError(
                f"Settings that the {self.name} model family does not use: {'; '.join(problems)} (or pick a "
                "preset of a family that reads it)."
            )
        return {f.name: getattr(settings, f.name) for f in family_option_fields(settings) if f.name in self.options}

    def with_options(self, settings: Any) -> ModelFamily:
        """This family configured by the family options of ``settings`` (checked by ``check_options``); ``settings``
        None, or none of them read: the family itself."""
        if settings is None:
            return self
        values = self.check_options(settings)
        return self.configured(values) if values else self

    def configured(self, options: Mapping[str, Any]) -> ModelFamily:
        """A family like this one reading ``options`` (names in ``self.options``); a family with options overrides
        it."""
        raise NotImplementedError(f"The {self.name} family reads options {sorted(self.options)} but cannot take them.")

    # -- loading
    @abstractmethod
    def handles(self, pipe: Any) -> bool:
        """True when ``pipe`` is a pipeline of this family (``family_for`` asks each registered family)."""

    @abstractmethod
    def load(self, spec: BaseModelSpec, cache_root: Path) -> Any:
        """The pipeline for ``spec`` on ``spec.device`` in ``spec.dtype``, progress bars off."""

    def component(self, pipe: Any, name: str) -> torch.nn.Module:
        return getattr(pipe, name)

    def frozen_encoders(self, pipe: Any) -> dict[str, torch.nn.Module]:
        """The VAE and text encoders by name: what training moves off the accelerator and back."""
        return {name: self.component(pipe, name) for name in (self.vae, *self.text_encoders)}

    def lora_components(self, pipe: Any, train_text_encoders: bool) -> dict[str, torch.nn.Module]:
        """The modules that get a LoRA adapter, denoiser first."""
        names = (self.denoiser, *(self.text_encoders if train_text_encoders else ()))
        return {name: self.component(pipe, name) for name in names}

    def identity(self, pipe: Any) -> dict[str, str]:
        """What a training checkpoint records of the base model, so it resumes only on the same weights."""
        return {self.denoiser: module_identity(self.component(pipe, self.denoiser))}

    # -- prompts
    @abstractmethod
    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings (N, L, D), pooled embeddings (N, P)) exactly as the family's inference computes them
        (no classifier-free guidance)."""

    @abstractmethod
    def prompt_encoder_identity(self, pipe: Any) -> str:
        """The text cache's key part: changes whenever ``encode_prompts`` could give other numbers."""

    # -- latents
    def encode_pixels(self, pipe: Any, pixels: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Model latents (float32) of ``pixels`` (N, 3, H, W) in [-1, 1]: THE pixel → latent map, used by the
        training latent cache and by MuDI's layout encoding alike."""
        return encode_to_model_latents(self.component(pipe, self.vae), pixels, device)

    @abstractmethod
    def latent_channels(self, pipe: Any) -> int:
        """C of the model latents (4 for SDXL, 16 for FLUX)."""

    @abstractmethod
    def downsampling_factor(self, pipe: Any) -> int:
        """Pixels per latent cell along each side (8 for SDXL's VAE)."""

    def size_multiple(self, pipe: Any) -> int:
        """What every training or rendering side must be a multiple of: latent downsampling x patch size (SDXL 8,
        FLUX 16). Aspect-ratio buckets are built on it (docs/design.md#aspect-ratio-buckets)."""
        return self.downsampling_factor(pipe) * self.patch_size

    @abstractmethod
    def latent_dtype(self, pipe: Any) -> torch.dtype:
        """The dtype the family's pipeline draws its initial noise in."""

    # -- training
    @abstractmethod
    def objective(self, pipe: Any) -> TrainingObjective:
        """Noising and training target for ``pipe``'s scheduler."""

    def conditioning(self, geometries: Sequence[ImageGeometry], resolution: int) -> dict[str, torch.Tensor]:
        """Per-sample extra conditioning tensors (N, ...) besides the prompt (SDXL: size and crop time ids)."""
        del geometries, resolution
        return {}

    @abstractmethod
    def predict(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """The denoiser's prediction (shaped like ``noisy``); ``denoiser`` may be a DDP or compiled wrapper."""

    # -- LoRA
    @abstractmethod
    def add_lora(self, component: str, model: torch.nn.Module, spec: LoraSpec, adapter_name: str) -> None:
        """Attach a trainable fp32 adapter to ``component`` (the family knows its target modules)."""

    @abstractmethod
    def lora_state_dict(self, component: str, model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """``adapter_name``'s weights in the family's file naming: the denoiser's with its component prefix
        (``unet.…``), a text encoder's without (the exporter adds it)."""

    @abstractmethod
    def load_lora(
        self, component: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str
    ) -> None:
        """Copy ``state`` (``lora_state_dict`` naming) into the existing adapter ``adapter_name``, refusing a
        different rank or target set."""

    def kohya_lora_modules(self, pipe: Any) -> dict[str, tuple[tuple[str, slice], ...]] | None:
        """Kohya module name (``lora_unet_…``) -> the denoiser modules it holds, each with its rows of the kohya
        ``lora_up`` (one module with all rows unless the format fuses layers), for reading a user's kohya LoRA file
        (docs/design.md#modular-customization); None when the family cannot read kohya files."""
        del pipe
        return None

    @abstractmethod
    def export_lora(
        self, out_dir: Path, pipe: Any, spec: LoraSpec, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Path]:
        """Write the trained adapter of ``pipe`` in the family's file formats; returns ``{format: path}``."""

    # -- generation
    @abstractmethod
    def render(self, pipe: Any, request: RenderRequest) -> Image.Image:
        """One image through the family's pipeline, starting from ``request.initial_latents`` when given."""

    def render_batch(self, pipe: Any, requests: Sequence[RenderRequest]) -> list[Image.Image]:
        """One image per request, in order: each is ``render``'s image for its request, up to the rounding of batched
        float arithmetic. The default renders them one by one; a family whose pipeline batches overrides it."""
        return [self.render(pipe, request) for request in requests]
