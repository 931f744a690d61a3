"""The per-pair assets: references → segments, captions, class_images → segmix_bank.

Each asset validates its partition key, calls one stage function from ``pipeline.stages``, and turns the
result into metadata (counts, tables, preview grids) and lineage rows.
"""

import dagster as dg

from assets.compute import cpu_step, gpu_step
from assets.launchpad import ClassImagesConfig, ReferencesConfig, SegmentsConfig, SegMixBankConfig
from assets.metadata import grid_md, table_md, user_errors
from assets.partitions import REFERENCES_FINGERPRINT, character_pairs, pair_key
from pipeline.captions import CaptionCache
from pipeline.images import IntakeConfig
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import SegmentConfig
from pipeline.settings import resolve
from pipeline.stages.captions import USER_BACKEND, run_captions, user_caption_files
from pipeline.stages.class_images import run_class_images
from pipeline.stages.references import run_references
from pipeline.stages.segments import USABLE, run_segments
from pipeline.stages.segmix_bank import run_segmix_bank
from pipeline.storage.manifest import read_manifest
from pipeline.storage.registry import references_fingerprint
from resources import CaptionerResource, ModelResource, StorageResource

GROUP = "castlora"


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
    intake = config.settings(IntakeConfig)
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
    seg_config = config.settings(SegmentConfig)
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
    generation = resolve(config.settings(ClassImageConfig), preset)
    seg_config = config.settings(SegmentConfig)
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
    bank = config.bank_config(models.resolved_preset())
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
