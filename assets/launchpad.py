"""The launchpad's run configs, derived from the settings dataclasses: each setting is declared once.

A launchpad config is built by ``launchpad_config`` from one or more settings dataclasses: it has exactly their
user fields (``pipeline.settings.user_fields``; a field added to a dataclass appears here without further edits),
with their defaults and their docstrings as descriptions. ``config.settings(Cls)`` turns it back into a ``Cls``,
and ``pipeline.settings.resolve`` (``resolve_train_config`` for training) fills what the run left unset from the
model preset. The dataclasses below hold the settings that only the asset layer reads (no pipeline dataclass of
their own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import dagster as dg
from pydantic import create_model

from pipeline.errors import CastloraError
from pipeline.images import IntakeConfig
from pipeline.infer import DEFAULT_NEGATIVE
from pipeline.iteration_rules import IterationConfig
from pipeline.layout_control import PromptEntry, parse_prompt_entries
from pipeline.lora.modular import ModularConfig
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import SegmentConfig
from pipeline.segmix.compose import SegMixConfig
from pipeline.settings import ZERO_IS_A_VALUE, family_option, from_preset, preset_attribute, resolve, user_fields
from pipeline.stages.character_images import CharacterImagesConfig
from pipeline.stages.evaluation import VARIANTS
from pipeline.stages.segmix_bank import BankConfig
from pipeline.train import TrainConfig
from resources.config_fields import config_field, from_config_value

Settings = TypeVar("Settings")


class LaunchpadConfig(dg.Config):
    """Base of every derived launchpad config: ``settings`` rebuilds the dataclasses it was derived from."""

    sources: ClassVar[tuple[type, ...]] = ()

    def settings(self, cls: type[Settings]) -> Settings:
        """The ``cls`` settings this run config holds (``cls`` is one of the dataclasses it was derived from).

        A ``from_preset`` field set to 0 is refused: before these settings were declared once, 0 meant "the
        preset's default" there; now that is ``null`` (not set), and 0 would silently mean something else.
        """
        if cls not in self.sources:
            raise CastloraError(f"{type(self).__name__} holds no {cls.__name__} settings.")
        values = {}
        for field in launchpad_fields(cls):
            value = getattr(self, field.name)
            zero_refused = preset_attribute(field) and not field.metadata.get(ZERO_IS_A_VALUE)
            if zero_refused and value == 0 and not isinstance(value, bool):
                raise CastloraError(
                    f"{type(self).__name__}.{field.name}=0: leave {field.name} unset (null) for the model preset's "
                    f"{preset_attribute(field)}; 0 no longer stands for the preset's default."
                )
            values[field.name] = from_config_value(cls, field.name, value)
        return cls(**values)


def launchpad_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of ``cls`` the launchpad offers: its user fields, less nested settings (composed elsewhere)."""
    return tuple(f for f in user_fields(cls) if not _is_nested_settings(f))


def _is_nested_settings(field: dataclasses.Field) -> bool:
    factory = field.default_factory
    return factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory)


def launchpad_config(name: str, *sources: type, base: type[LaunchpadConfig] = LaunchpadConfig) -> type:
    """A ``dg.Config`` named ``name`` with the launchpad fields of every dataclass in ``sources``."""
    fields: dict[str, Any] = {}
    for cls in sources:
        for field in launchpad_fields(cls):
            if field.name in fields:
                raise TypeError(f"{name}: field {field.name!r} is declared by more than one of {sources}")
            fields[field.name] = config_field(cls, field)
    model = create_model(name, __base__=base, __module__=__name__, **fields)
    model.sources = sources
    model.__doc__ = f"Run config of the settings {', '.join(cls.__name__ for cls in sources)} (assets/launchpad.py)."
    return model


@dataclasses.dataclass(frozen=True)
class LoraValidation:
    validation_prompts: tuple[str, ...] = ()
    """Prompts rendered with the new LoRA after training; empty: two of the default scene prompts with the
    characters' token phrases."""


@dataclasses.dataclass(frozen=True)
class SegMixCanvas:
    canvas_width: int | None = from_preset("resolution")
    """Width of the Seg-Mix composites in pixels. Not set: the model preset's resolution."""
    canvas_height: int | None = from_preset("resolution")
    """Height of the Seg-Mix composites in pixels. Not set: the model preset's resolution."""


@dataclasses.dataclass(frozen=True)
class SamplesSettings:
    """How the ``samples`` asset renders the characters together with the pair's LoRA."""

    prompts: tuple[Any, ...] = ()
    """Each entry a prompt text (random Seg-Mix layout) or {prompt: ..., layout: ...} with layout one of: auto;
    llm (boxes asked of the captioner resource's OpenAI-compatible model); {mode: boxes, boxes: {dog6: [x0, y0,
    x1, y1], dog2: [...]}} (fractions of the canvas, one box per character id); {mode: sizes, sizes: {dog6: 2,
    dog2: 1}} (relative heights, places drawn at random). Empty: the default scene prompts filled with the token
    phrases."""
    llm_layout_retries: int = 2
    """How often a bad LLM layout answer is asked again before that prompt falls back to the auto layout (the
    warning is recorded with each of its images)."""
    seeds: tuple[int, ...] = (0, 1)
    """Image k of every prompt uses seeds[k]."""
    gamma: float | None = 1.0
    """MuDI init weight γ: how strongly the encoded Seg-Mix layout enters the initial latent (0: plain noise, but
    the layout is still drawn and recorded). null: plain noise without a layout."""
    layout_seed_offset: int = 0
    """Added to each image's seed to draw its Seg-Mix layout."""
    lora_scale: float = 1.0
    """Strength of the LoRA."""
    use_default_negative: bool = True
    """Negative prompt "sticker, collage" against Seg-Mix sticker artefacts. FLUX.1: not passed (it would need true
    CFG, docs/design.md#flux1), so it has no effect."""
    steps: int | None = from_preset("inference_steps")
    """Denoising steps. Not set: the model preset's ``inference_steps``."""
    guidance_scale: float | None = from_preset("guidance_scale", zero_is_a_value=True)
    """Guidance scale: classifier-free guidance for SDXL, the distilled guidance for FLUX.1-dev (FLUX.1-schnell
    ignores it). Not set: the model preset's ``guidance_scale``."""
    true_cfg_scale: float = family_option(1.0)
    """FLUX.1 only: > 1 renders the negative prompt with true classifier-free guidance at this scale (two transformer
    passes per step, about twice as slow); 1: off, and FLUX.1 ignores the negative prompt."""
    resolution: int | None = from_preset("resolution")
    """Square image side in pixels. Not set: the model preset's resolution."""

    def __post_init__(self) -> None:
        if self.llm_layout_retries < 0:
            raise CastloraError(f"samples llm_layout_retries={self.llm_layout_retries} must be >= 0.")
        if self.gamma is not None and self.gamma < 0:
            raise CastloraError(
                f"samples gamma={self.gamma}: a negative gamma no longer means plain noise; set gamma to null for "
                "plain noise (or >= 0 for MuDI's init)."
            )

    @property
    def negative_prompt(self) -> str | None:
        return DEFAULT_NEGATIVE if self.use_default_negative else None

    def prompt_entries(self, character_ids: Sequence[str]) -> list[PromptEntry]:
        """The prompts with their layouts, every layout checked against the pair's characters (before any
        rendering); docs/design.md#layout-control."""
        return parse_prompt_entries(self.prompts, character_ids)


@dataclasses.dataclass(frozen=True)
class QualityRenderSettings:
    """How the iteration and evaluation assets render images with a LoRA."""

    prompts: tuple[str, ...] = ()
    """Empty: the default scene prompts with the characters' token phrases (evaluation: the first
    ``eval_prompts`` of them, from the model preset)."""
    inference_steps: int | None = from_preset("inference_steps")
    """Denoising steps. Not set: the model preset's ``inference_steps``."""
    guidance_scale: float | None = from_preset("guidance_scale", zero_is_a_value=True)
    """Guidance scale: classifier-free guidance for SDXL, the distilled guidance for FLUX.1-dev (FLUX.1-schnell
    ignores it). Not set: the model preset's ``guidance_scale``."""
    true_cfg_scale: float = family_option(1.0)
    """FLUX.1 only: > 1 renders the negative prompt with true classifier-free guidance at this scale (two transformer
    passes per step, about twice as slow); 1: off, and FLUX.1 ignores the negative prompt."""
    use_default_negative: bool = True
    """Negative prompt "sticker, collage" against Seg-Mix sticker artefacts. FLUX.1: not passed (it would need true
    CFG, docs/design.md#flux1), so it has no effect."""
    resolution: int | None = from_preset("resolution")
    """Square image side in pixels. Not set: the model preset's resolution."""

    @property
    def negative_prompt(self) -> str | None:
        return DEFAULT_NEGATIVE if self.use_default_negative else None


@dataclasses.dataclass(frozen=True)
class IterationRun:
    """What one materialization of the iteration asset does."""

    seed: int = 0
    """First seed of the rendered images."""
    rounds_per_run: int | None = None
    """Most new rounds per materialization (1: one round per run, the next run continues); not set: run until
    the loop stops."""

    def __post_init__(self) -> None:
        if self.rounds_per_run is not None and self.rounds_per_run < 1:
            raise CastloraError(
                f"rounds_per_run={self.rounds_per_run} must be >= 1; leave it unset (null) to run until the loop "
                "stops (0 no longer means that)."
            )


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """Which variants the evaluation compares, and on which seeds."""

    variants: tuple[str, ...] = VARIANTS
    """Any of dreambooth (LoRA without Seg-Mix, trained here), segmix, segmix_init, iterative; and, for a pair given
    as character LoRA files, naive_merge (both loaded at once), merged (their merge), merged_segmix (the merge after
    its Seg-Mix fine-tune; skipped with a note for pairs of photos)."""
    seeds: tuple[int, ...] = ()
    """Empty: the model preset's ``eval_seeds`` seeds from 1000."""
    gamma: float = 1.0
    """MuDI init weight γ for the segmix_init and iterative variants."""

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise CastloraError(f"Unknown evaluation variant(s) {unknown}; choose from {list(VARIANTS)}.")


class SegMixBankBase(LaunchpadConfig):
    def bank_config(self, preset: Any) -> BankConfig:
        """The bank's settings, its Seg-Mix canvas resolved against the model preset."""
        canvas = resolve(self.settings(SegMixCanvas), preset)
        segmix = self.settings(SegMixConfig)
        segmix = dataclasses.replace(
            segmix,
            canvas=(canvas.canvas_width, canvas.canvas_height),
            relative_scale=segmix.relative_scale or None,  # an empty mapping (the old launchpad default) is none
        )
        return dataclasses.replace(self.settings(BankConfig), segmix=segmix)


LoraTrainingConfig = launchpad_config("LoraTrainingConfig", TrainConfig, LoraValidation, ModularConfig)
CharacterImagesAssetConfig = launchpad_config("CharacterImagesAssetConfig", CharacterImagesConfig)
SamplesConfig = launchpad_config("SamplesConfig", SamplesSettings)
ReferencesConfig = launchpad_config("ReferencesConfig", IntakeConfig)
SegmentsConfig = launchpad_config("SegmentsConfig", SegmentConfig)
ClassImagesConfig = launchpad_config("ClassImagesConfig", ClassImageConfig, SegmentConfig)
SegMixBankConfig = launchpad_config("SegMixBankConfig", BankConfig, SegMixConfig, SegMixCanvas, base=SegMixBankBase)
IterationAssetConfig = launchpad_config("IterationAssetConfig", IterationConfig, QualityRenderSettings, IterationRun)
EvaluationAssetConfig = launchpad_config("EvaluationAssetConfig", EvaluationSettings, QualityRenderSettings)

LAUNCHPAD_CONFIGS = (
    LoraTrainingConfig,
    CharacterImagesAssetConfig,
    SamplesConfig,
    ReferencesConfig,
    SegmentsConfig,
    ClassImagesConfig,
    SegMixBankConfig,
    IterationAssetConfig,
    EvaluationAssetConfig,
)
