"""Model presets: one name chooses every model castlora uses.

A model reference is a Hugging Face id (``google/owlv2-base-patch16-ensemble``), a local directory
saved with ``save_pretrained``, or ``tiny:<name>``: a random-init model built from a small config on
first use and saved to the model cache, then loaded through the same ``from_pretrained`` code as real
weights. Tiny models run on CPU in seconds; their outputs are meaningless, their shapes are real.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from pipeline.errors import CastloraError


@dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """Which model does each job. A preset names them all; the models resource overrides any of them per
    deployment (its fields are derived from these)."""

    detector: str
    """Open-vocabulary detector (OWLv2) for segmentation and Detect-and-Compare: hub id or local directory."""
    sam: str
    """Segment Anything, prompted with the detector's box."""
    base_model: str
    """Diffusers pipeline directory or id of ``family``: class images, LoRA training and generation."""
    family: str = "sdxl"
    """Model family of ``base_model`` (``sdxl`` or ``flux``, the keys of ``pipeline.families.FAMILIES``;
    docs/design.md#model-families). The preset sets it (``tiny-flux``, ``flux``: ``flux``): to switch family, switch
    preset; override it only together with a ``base_model`` of that family."""
    vlm: str
    """Local captioning VLM for the ``transformers`` caption backend."""
    segmenter_backend: str
    """``owlv2_sam``, ``ultralytics`` or ``grabcut`` (labelled classical fallback)."""
    dino: str = "facebook/dinov2-base"
    """DINOv2 image embedder for Detect-and-Compare and DINO similarity (mean of last_hidden_state, as MuDI)."""
    clip: str = "openai/clip-vit-large-patch14"
    """CLIP (image and text towers) for CLIP-I, CLIP-T and the DreamSim-style ensemble."""
    image_reward: str | None = None
    """ImageReward weights (file or directory); None: the metric is reported as unavailable."""
    dnc_detector: str = "owlv2"
    """Who finds the characters for D&C: ``owlv2`` (the detector above) or ``layout`` (the generation layout's
    boxes: a labelled fallback for random-init models, whose detections mean nothing)."""
    dnc_threshold: float = 0.4
    """OWLv2 score threshold for D&C (MuDI's demo uses 0.4)."""
    ultralytics_detector: str = "yolov8s-worldv2.pt"
    """YOLO-World weights for the ``ultralytics`` segmenter backend."""
    ultralytics_sam: str = "sam2.1_b.pt"
    """SAM weights for the ``ultralytics`` segmenter backend."""


@dataclass(frozen=True, kw_only=True)
class ModelPreset(ModelChoice):
    """The models (``ModelChoice``) plus the run defaults that suit them: what a setting declared with
    ``pipeline.settings.from_preset`` becomes when a run leaves it unset."""

    name: str
    resolution: int = 1024
    """Native training/generation resolution: the Seg-Mix canvas and class images default to it."""
    class_image_steps: int = 30
    """Denoising steps per class image."""
    class_images_per_noun: int = 100
    """Class images per class noun (MuDI/DreamBooth: about 100)."""
    train_steps: int = 800
    """LoRA steps when a run does not set them (MuDI trains SDXL for ~1000-2000 steps at rank 32)."""
    inference_steps: int = 30
    """Denoising steps for samples, iteration and evaluation images."""
    guidance_scale: float = 5.0
    """Guidance scale of class images, samples, iteration and evaluation images: classifier-free guidance for SDXL,
    the distilled guidance embedding for FLUX.1-dev (its recommended 3.5); FLUX.1-schnell has no guidance input."""
    iteration_images: int = 200
    """Images per round of iterative self-generation (MuDI: 200) ..."""
    iteration_keep: int = 50
    """... of which the best this many are kept (MuDI: 50) ..."""
    iteration_steps: int = 1000
    """... and fine-tuned on for this many steps (MuDI: ~1000)."""
    iteration_rounds: int = 5
    """Most rounds of generate → score → keep (The Chosen One: ≤ 5)."""
    eval_prompts: int = 8
    """Prompts of the evaluation grid (the first default scene prompts) ..."""
    eval_seeds: int = 4
    """... times this many fixed seeds."""

    def with_overrides(self, **overrides: Any) -> ModelPreset:
        """This preset with the given ``ModelChoice`` fields replaced; None leaves a field as the preset has it."""
        choices = {f.name for f in fields(ModelChoice)}
        unknown = sorted(set(overrides) - choices)
        if unknown:
            raise CastloraError(f"{unknown} are not model choices; a preset's models are {sorted(choices)}.")
        empty = sorted(name for name, value in overrides.items() if value == "")
        if empty:
            raise CastloraError(
                f"Model override(s) {empty} are empty strings: leave them unset (null) to use the preset's models."
            )
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: dict[str, ModelPreset] = {
    # Random-init models: the OWLv2/SAM code path runs but finds nothing meaningful, so the tiny
    # preset segments with the labelled GrabCut fallback unless a run asks for owlv2_sam explicitly.
    "tiny": ModelPreset(
        name="tiny",
        detector="tiny:owlv2",
        sam="tiny:sam",
        base_model="tiny:sdxl",
        vlm="tiny:vlm",
        segmenter_backend="grabcut",
        resolution=256,
        class_image_steps=2,
        class_images_per_noun=4,
        train_steps=30,
        inference_steps=3,
        iteration_images=4,
        iteration_keep=2,
        iteration_steps=10,
        iteration_rounds=2,
        eval_prompts=2,
        eval_seeds=2,
        dino="tiny:dinov2",
        clip="tiny:clip",
        dnc_detector="layout",
        ultralytics_detector="tiny:yolo-world",
        ultralytics_sam="tiny:ultralytics-sam",
    ),
    "sdxl": ModelPreset(
        name="sdxl",
        detector="google/owlv2-base-patch16-ensemble",
        sam="facebook/sam-vit-huge",
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        vlm="Salesforce/blip-image-captioning-large",
        segmenter_backend="owlv2_sam",
    ),
}
# FLUX.1: the same detectors, captioner and embedders as the SDXL presets; only the base model differs.
# FLUX.1-dev renders with distilled guidance 3.5 (its model card), not SDXL's CFG 5.0.
PRESETS["tiny-flux"] = replace(
    PRESETS["tiny"], name="tiny-flux", base_model="tiny:flux", family="flux", guidance_scale=3.5
)
PRESETS["flux"] = replace(
    PRESETS["sdxl"],
    name="flux",
    base_model="black-forest-labs/FLUX.1-dev",
    family="flux",
    resolution=1024,
    inference_steps=28,  # FLUX.1-dev's recommended step count
    guidance_scale=3.5,
)
# FLUX.1-schnell: timestep-distilled to a few steps, no guidance embedding (its model card renders 4 steps at
# guidance 0.0, which the pipeline ignores). A local folder of a schnell-shaped model works with either FLUX preset.
PRESETS["flux-schnell"] = replace(
    PRESETS["flux"],
    name="flux-schnell",
    base_model="black-forest-labs/FLUX.1-schnell",
    class_image_steps=4,
    inference_steps=4,
    guidance_scale=0.0,
)


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CastloraError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.") from None
