"""Model presets: one name chooses every model castlora uses.

A model reference is a Hugging Face id (``google/owlv2-base-patch16-ensemble``), a local directory
saved with ``save_pretrained``, or ``tiny:<name>``: a random-init model built from a small config on
first use and saved to the model cache, then loaded through the same ``from_pretrained`` code as real
weights. Tiny models run on CPU in seconds; their outputs are meaningless, their shapes are real.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.errors import CastloraError


@dataclass(frozen=True)
class ModelPreset:
    name: str
    detector: str
    """Open-vocabulary detector (OWLv2) for segmentation and Detect-and-Compare."""
    sam: str
    """Segment Anything, prompted with the detector's box."""
    base_model: str
    """Diffusers SDXL-layout directory or id: class images now, LoRA training later."""
    vlm: str
    """Local captioning VLM for the ``transformers`` caption backend."""
    segmenter_backend: str
    """Backend used when a run does not choose one: ``owlv2_sam``, ``ultralytics`` or ``grabcut``."""
    resolution: int = 1024
    """Native training/generation resolution: the Seg-Mix canvas and class images default to it."""
    class_image_steps: int = 30
    class_images_per_noun: int = 100
    train_steps: int = 800
    """LoRA steps when a run does not set them (MuDI trains SDXL for ~1000-2000 steps at rank 32)."""
    inference_steps: int = 30
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
    dino: str = "facebook/dinov2-base"
    """DINOv2 image embedder for Detect-and-Compare and DINO similarity (mean of last_hidden_state, as MuDI)."""
    clip: str = "openai/clip-vit-large-patch14"
    """CLIP (image and text towers) for CLIP-I and CLIP-T."""
    image_reward: str = ""
    """ImageReward weights (file or directory); empty = the metric is reported as unavailable."""
    dnc_detector: str = "owlv2"
    """Who finds the characters for D&C: ``owlv2`` (the detector above) or ``layout`` (the generation layout's
    boxes: a labelled fallback for random-init models, whose detections mean nothing)."""
    dnc_threshold: float = 0.4
    """OWLv2 score threshold for D&C (MuDI's demo uses 0.4)."""
    ultralytics_detector: str = "yolov8s-worldv2.pt"
    ultralytics_sam: str = "sam2.1_b.pt"

    def with_overrides(self, **overrides: str | None) -> ModelPreset:
        return replace(self, **{k: v for k, v in overrides.items() if v})


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


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CastloraError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.") from None
