"""Model choice and placement: a preset names every model; fields override single models or the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import ConfigDict, create_model

from pipeline.models.loading import resolve_model
from pipeline.models.presets import PRESETS, ModelChoice, ModelPreset, get_preset
from resources.config_fields import config_field

PresetName = Enum("PresetName", {name: name for name in PRESETS}, type=str, module=__name__)  # type: ignore[misc]
"""The preset names as a config enum: the launchpad offers them and refuses a misspelt one before the run starts."""

ModelOverrides = create_model(
    "ModelOverrides",
    __base__=dg.ConfigurableResource,
    __module__=__name__,
    **{f.name: config_field(ModelChoice, f, override=True) for f in fields(ModelChoice)},
)
"""One optional override per ``ModelChoice`` field of the preset, derived from that dataclass (declared once)."""


class ModelResource(ModelOverrides):  # type: ignore[misc, valid-type]
    """Models for every stage, chosen by ``preset`` (``tiny``/``tiny-flux``: random-init SDXL/FLUX.1, CPU, offline;
    ``sdxl``/``flux``: real weights); every ``ModelChoice`` field of the preset (detector, sam, base_model, family,
    ...) can be overridden here."""

    # The docstrings under the fields are the launchpad's field descriptions (Dagster shows pydantic descriptions).
    model_config = ConfigDict(use_attribute_docstrings=True)

    preset: PresetName = PresetName("tiny")  # type: ignore[valid-type]
    """Model preset, naming the base model, its family and every other model: ``tiny`` (tiny random SDXL, CPU,
    offline), ``sdxl`` (SDXL base 1.0), ``tiny-flux`` (tiny random FLUX.1, CPU, offline), ``flux`` (FLUX.1-dev) or
    ``flux-schnell`` (FLUX.1-schnell). Switching family means switching preset; ``family`` alone does not change
    ``base_model``."""
    vae: str | None = None
    """Optional VAE override for the base model, e.g. the fp16-fix SDXL VAE (madebyollin/sdxl-vae-fp16-fix) as a
    hub id or local directory; the stock SDXL VAE overflows in fp16. Not set: the base model's own VAE."""
    device: str = "auto"
    """``auto`` picks CUDA when present, else CPU."""
    dtype: str = "auto"
    """``auto``: float16 on CUDA, float32 on CPU; or a torch dtype name (``bfloat16``, ``float32``)."""
    train_processes: int = 1
    """LoRA training processes: 1 trains in the step's own process; more start that many ranks (one per GPU, or
    gloo on CPU) through ``accelerate launch`` (env CASTLORA_TRAIN_PROCESSES). Resuming needs the same number."""
    accelerate_config_file: str = ""
    """Optional ``accelerate config`` yaml for multi-process training (e.g. gpu_ids); the process count, port and
    mixed precision set by castlora override its values."""

    def resolved_preset(self) -> ModelPreset:
        """The preset with this resource's model overrides applied: what every stage reads its models from."""
        preset = get_preset(PresetName(self.preset).value)
        return preset.with_overrides(**{f.name: getattr(self, f.name) for f in fields(ModelChoice)})

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.torch_device().startswith("cuda") else "float32"

    def segmenter_model_ids(self) -> list[str]:
        preset = self.resolved_preset()
        if preset.segmenter_backend == "owlv2_sam":
            return [preset.detector, preset.sam]
        if preset.segmenter_backend == "ultralytics":
            return [preset.ultralytics_detector, preset.ultralytics_sam]
        return []

    def segmenter_factory(self, cache_root: Path, config: Any) -> Callable[[], Any]:
        """A loader for the stages to call when some photo actually needs the models."""
        preset = self.resolved_preset()

        def load() -> Any:
            import torch

            from pipeline.segment.factory import create_segmenter

            if preset.segmenter_backend == "ultralytics":
                detector = resolve_model(preset.ultralytics_detector, cache_root, "YOLO-World", "weights.pt")
                sam = resolve_model(preset.ultralytics_sam, cache_root, "ultralytics SAM", "weights.pt")
            elif preset.segmenter_backend == "owlv2_sam":
                detector = resolve_model(preset.detector, cache_root, "detector (OWLv2)")
                sam = resolve_model(preset.sam, cache_root, "segmenter (SAM)")
            else:
                detector = sam = ""
            return create_segmenter(
                preset.segmenter_backend,
                detector_source=detector,
                sam_source=sam,
                device=self.torch_device(),
                dtype=getattr(torch, self.torch_dtype_name()),
                config=config,
            )

        return load

    def base_model_spec(self) -> Any:
        """The base model as ``pipeline.models.base_model.BaseModelSpec`` (source, family, VAE, device, dtype)."""
        from pipeline.models.base_model import BaseModelSpec

        preset = self.resolved_preset()
        return BaseModelSpec(
            source=preset.base_model,
            family=preset.family,
            vae_source=self.vae,
            device=self.torch_device(),
            dtype=self.torch_dtype_name(),
        )

    def base_pipeline_factory(self, cache_root: Path) -> Callable[[], Any]:
        from pipeline.families import load_base_pipeline

        spec = self.base_model_spec()
        return lambda: load_base_pipeline(spec, cache_root)

    def trainer(self, cache_root: Path) -> Callable[..., Any]:
        """What ``run_lora`` trains with: ``train_lora`` in-process for one process, else a launcher that runs
        ``train_processes`` ranks, each loading this resource's base model (``cache_root`` as for the pipeline)."""
        from pipeline.train import train_lora
        from pipeline.train.launch import LaunchSettings, distributed_trainer

        if self.train_processes == 1:
            return train_lora
        device = self.torch_device()
        settings = LaunchSettings(
            num_processes=self.train_processes,
            accelerate_config_file=self.accelerate_config_file,
            use_cpu={"cpu": True, "cuda": False}.get(device.split(":")[0]),  # other devices: auto (CUDA if any)
        )
        return distributed_trainer(settings, self.base_model_spec(), model_cache=cache_root)

    def dnc_scorer(self, subjects: Any, cache_root: Path) -> Any:
        """D&C for a pair's characters (``pipeline.dnc.pair_scorer.DncScorer``): detector and every embedder the preset
        can load; the others are listed as unavailable."""
        import torch

        from pipeline.dnc.pair_scorer import load_dnc_scorer

        preset = self.resolved_preset()
        return load_dnc_scorer(
            subjects,
            detector=preset.dnc_detector,
            detector_source=preset.detector,
            threshold=preset.dnc_threshold,
            embedder_sources={"dinov2": preset.dino, "clip": preset.clip},
            cache_root=cache_root,
            device=self.torch_device(),
            dtype=getattr(torch, self.torch_dtype_name()),
        )

    def clip_t_scorer(self, cache_root: Path, scorer: Any = None) -> tuple[Any, str]:
        """``(images, texts) -> similarities`` for CLIP-T, or ``(None, why unavailable)``; reuses the scorer's CLIP."""
        import torch

        from pipeline.dnc.embed import load_clip_text_scorer

        shared = getattr(scorer, "embedders", {}).get("clip") if scorer is not None else None
        loaded, reason = load_clip_text_scorer(
            self.resolved_preset().clip,
            cache_root,
            device=self.torch_device(),
            dtype=getattr(torch, self.torch_dtype_name()),
            shared=shared,
        )
        return (loaded.paired_similarity if loaded is not None else None), (reason or "")
