"""The per-pair assets: references → segments, captions, class_images → segmix_bank.

Each asset validates its partition key, calls one stage function from ``pipeline.stages``, and turns the
result into metadata (counts, tables, preview grids) and lineage rows.
"""

import dagster as dg
from pydantic import Field

from assets.compute import cpu_step, gpu_step
from assets.metadata import grid_md, table_md, user_errors
from assets.partitions import REFERENCES_FINGERPRINT, character_pairs, pair_key
from pipeline.captions import CaptionCache
from pipeline.images import IntakeConfig
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import SegmentConfig
from pipeline.segmix.compose import SegMixConfig
from pipeline.stages.captions import USER_BACKEND, run_captions, user_caption_files
from pipeline.stages.class_images import run_class_images
from pipeline.stages.references import run_references
from pipeline.stages.segments import USABLE, run_segments
from pipeline.stages.segmix_bank import BankConfig, run_segmix_bank
from pipeline.storage.manifest import read_manifest
from pipeline.storage.registry import references_fingerprint
from resources import CaptionerResource, ModelResource, StorageResource

GROUP = "castlora"


class ReferencesConfig(dg.Config):
    min_side: int = 256
    max_side: int = 1536
    max_aspect_ratio: float = 4.0
    """Longer / shorter side above this is refused (e.g. 4.0 allows up to 4:1)."""
    min_photos: int = 3


class SegmentsConfig(dg.Config):
    detection_threshold: float = 0.1
    nms_iou: float = 0.5
    min_mask_fraction: float = 0.01

    def segment_config(self) -> SegmentConfig:
        return SegmentConfig(
            detection_threshold=self.detection_threshold,
            nms_iou=self.nms_iou,
            min_mask_fraction=self.min_mask_fraction,
        )


class SegMixBankConfig(dg.Config):
    n_instance: int = 64
    """Composites of the characters' own cut-outs (token phrases)."""
    n_prior: int = 32
    """Composites of class-image cut-outs (class nouns); 0 disables them."""
    seed: int = 0
    canvas_width: int = 0
    """0 uses the model preset's resolution."""
    canvas_height: int = 0
    k: int = 2
    """Subjects per composite (at most the number of characters)."""
    max_occlusion: float = 0.3
    min_subject_fraction: float = 0.02
    max_upscale: float = 2.0
    background: str = "white"
    """white, black, or r,g,b (e.g. 128,128,128)."""
    relative_scale: dict[str, float] = Field(default_factory=dict)
    """character id or phrase → relative height, e.g. {"dog6": 2.0, "toy1": 1.0}; empty: fit each."""

    def bank_config(self, resolution: int) -> BankConfig:
        background: str | tuple[int, int, int] = self.background
        if "," in self.background:
            background = tuple(int(v) for v in self.background.split(","))  # type: ignore[assignment]
        segmix = SegMixConfig(
            canvas=(self.canvas_width or resolution, self.canvas_height or resolution),
            k=self.k,
            relative_scale=dict(self.relative_scale) or None,
            max_occlusion=self.max_occlusion,
            min_subject_fraction=self.min_subject_fraction,
            max_upscale=self.max_upscale,
            background=background,
        )
        return BankConfig(n_instance=self.n_instance, n_prior=self.n_prior, seed=self.seed, segmix=segmix)


class ClassImagesConfig(dg.Config):
    count: int = 0
    """Images per class noun; 0 uses the model preset's default (100 for sdxl)."""
    resolution: int = 0
    """0 uses the preset's resolution."""
    steps: int = 0
    guidance_scale: float = 5.0
    seed: int = 0
    prompt_template: str = "a photo of a {class_noun}"
    """The generation prompt; recorded per image and trained with (imported images get it too)."""
    detection_threshold: float = 0.1


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    code_version="references-v1",
    kinds={"python", "parquet"},
    **cpu_step(),
    description="Validated, EXIF-oriented, de-duplicated RGB reference photos per character.",
)
@user_errors
def references(
    context: dg.AssetExecutionContext, config: ReferencesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    pair = pair_key(context)
    spec = storage.spec(pair)
    recorder = storage.recorder(context)
    intake = IntakeConfig(
        min_side=config.min_side,
        max_side=config.max_side,
        max_aspect_ratio=config.max_aspect_ratio,
        min_photos=config.min_photos,
    )
    out = run_references(spec, storage.output_dir(pair, "references"), intake, recorder)
    recorder.flush()
    for row in out.rejected.itertuples():
        context.log.warning(f"Skipped {row.source} ({row.character_id}): {row.reason}")
    counts = out.manifest.groupby("character_id").size().to_dict()
    storage.publish(context, pair, "references")
    return dg.MaterializeResult(
        metadata={
            "accepted": len(out.manifest),
            "rejected": len(out.rejected),
            # The retraining schedule compares this with the spec's current photos (assets/schedules.py).
            REFERENCES_FINGERPRINT: references_fingerprint(spec),
            "per_character": dg.MetadataValue.json(counts),
            "rejected_files": table_md(out.rejected),
            "manifest": dg.MetadataValue.path(str(out.manifest_path)),
            "preview": grid_md(out.manifest["path"].tolist(), columns=5),
        }
    )


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    deps=[references],
    code_version="segments-v1",
    kinds={"pytorch", "parquet"},
    **gpu_step(),
    description="Subject masks and RGBA cut-outs (user masks first, else OWLv2 → SAM or the chosen backend).",
)
@user_errors
def segments(
    context: dg.AssetExecutionContext, config: SegmentsConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    pair = pair_key(context)
    spec = storage.spec(pair)
    refs = read_manifest(storage.input_dir(pair, "references"), "references")
    seg_config = config.segment_config()
    recorder = storage.recorder(context)
    manifest = run_segments(
        refs,
        {c.id: c.masks_dir for c in spec.characters},
        storage.output_dir(pair, "segments"),
        models.segmenter_factory(storage.layout.models, seg_config),
        seg_config,
        recorder,
        model_ids=models.segmenter_model_ids(),
        confine_to=spec.confined_to,
    )
    recorder.flush()
    flagged = manifest[manifest["status"] != USABLE]
    for row in flagged.itertuples():
        context.log.warning(f"{row.source}: {row.status} — supply a mask in the spec's 'masks' folder")
    usable = manifest[manifest["status"] == USABLE]
    storage.publish(context, pair, "segments")
    return dg.MaterializeResult(
        metadata={
            "segmenters": dg.MetadataValue.json(manifest["segmenter"].value_counts().to_dict()),
            "usable": len(usable),
            "flagged": len(flagged),
            "flagged_photos": table_md(flagged[["character_id", "source", "status", "n_boxes"]]),
            "mean_mask_fraction": float(usable["mask_fraction"].mean()) if len(usable) else 0.0,
            "cutouts": grid_md(usable["cutout_path"].tolist(), columns=5),
        }
    )


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    deps=[references],
    code_version="captions-v1",
    kinds={"python", "parquet"},
    **cpu_step(),
    description="One caption per reference with the token phrase in place of the class noun (cached).",
)
@user_errors
def captions(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    captioner: CaptionerResource,
    models: ModelResource,
) -> dg.MaterializeResult:
    pair = pair_key(context)
    refs = read_manifest(storage.input_dir(pair, "references"), "references")
    backend = captioner.build(storage.layout.models, models.resolved_preset().vlm)
    recorder = storage.recorder(context)
    manifest = run_captions(
        refs,
        storage.output_dir(pair, "captions"),
        backend,
        CaptionCache(storage.layout.cache / "captions"),
        recorder,
        user_captions=user_caption_files(storage.spec(pair)),
    )
    recorder.flush()
    storage.publish(context, pair, "captions")
    return dg.MaterializeResult(
        metadata={
            "backend": backend.backend,
            "model": backend.model or "-",
            "prompt_version": backend.prompt_version,
            "cache_hits": int(manifest["cached"].sum()),
            "user_captions": int((manifest["backend"] == USER_BACKEND).sum()),
            "captions": table_md(manifest[["character_id", "caption", "cached"]]),
        }
    )


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    code_version="class-images-v2",
    kinds={"pytorch", "parquet"},
    **gpu_step(),
    description="Prior-preservation images per class noun (generated by the base model or imported), segmented.",
)
@user_errors
def class_images(
    context: dg.AssetExecutionContext,
    config: ClassImagesConfig,
    storage: StorageResource,
    models: ModelResource,
) -> dg.MaterializeResult:
    pair = pair_key(context)
    spec = storage.spec(pair)
    preset = models.resolved_preset()
    generation = ClassImageConfig(
        count=config.count or preset.class_images_per_noun,
        resolution=config.resolution or preset.resolution,
        steps=config.steps or preset.class_image_steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        prompt_template=config.prompt_template,
    )
    seg_config = SegmentConfig(detection_threshold=config.detection_threshold)
    recorder = storage.recorder(context)
    manifest = run_class_images(
        spec,
        storage.output_dir(pair, "class_images"),
        generation,
        models.base_pipeline_factory(storage.layout.models),
        preset.base_model,
        models.segmenter_factory(storage.layout.models, seg_config),
        seg_config,
        recorder,
        segmenter_model_ids=models.segmenter_model_ids(),
    )
    recorder.flush()
    usable = manifest[manifest["status"] == USABLE]
    storage.publish(context, pair, "class_images")
    return dg.MaterializeResult(
        metadata={
            "images": len(manifest),
            "usable_cutouts": len(usable),
            "origins": dg.MetadataValue.json(manifest["origin"].str.split(":").str[0].value_counts().to_dict()),
            "base_model": preset.base_model,
            "preview": grid_md(manifest["path"].tolist()[:16], columns=8),
        }
    )


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    deps=[segments, class_images],
    code_version="segmix-bank-v1",
    kinds={"python", "parquet"},
    **cpu_step(),
    description="A seeded bank of Seg-Mix composites (MuDI Alg. 1) with union/visible masks, boxes and prompts.",
)
@user_errors
def segmix_bank(
    context: dg.AssetExecutionContext,
    config: SegMixBankConfig,
    storage: StorageResource,
    models: ModelResource,
) -> dg.MaterializeResult:
    pair = pair_key(context)
    spec = storage.spec(pair)
    segs = read_manifest(storage.input_dir(pair, "segments"), "segments")
    bank = config.bank_config(models.resolved_preset().resolution)
    prior = read_manifest(storage.input_dir(pair, "class_images"), "class_images") if bank.n_prior else None
    recorder = storage.recorder(context)
    out = run_segmix_bank(
        segs,
        prior,
        {c.id: c.class_noun for c in spec.characters},
        storage.output_dir(pair, "segmix_bank"),
        bank,
        recorder,
    )
    recorder.flush()
    for note in out.notes:
        context.log.warning(note)
    manifest = out.manifest
    instance = manifest[manifest["kind"] == "instance"]
    prior_rows = manifest[manifest["kind"] == "prior"]
    occlusion = [max(o) for o in instance["occlusion"]]
    metadata = {
        "composites": dg.MetadataValue.json(manifest["kind"].value_counts().to_dict()),
        "canvas": f"{bank.segmix.canvas[0]}x{bank.segmix.canvas[1]}",
        "overlapping_fraction": float(sum(o > 0 for o in occlusion) / max(len(occlusion), 1)),
        "max_occlusion_seen": float(max(occlusion, default=0.0)),
        "example_prompts": table_md(instance[["index", "prompt"]].head(6)),
        "instance_samples": grid_md(instance["image_path"].head(12).tolist(), columns=6),
        "notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in out.notes) or "_none_"),
    }
    if len(prior_rows):
        metadata["prior_samples"] = grid_md(prior_rows["image_path"].head(6).tolist(), columns=6)
    storage.publish(context, pair, "segmix_bank")
    return dg.MaterializeResult(metadata=metadata)
