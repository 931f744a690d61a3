"""The per-pair assets: character_images → references → segments, captions, class_images → segmix_bank.

Each asset (``assets.stage_asset``) reads its inputs, calls one stage function from ``pipeline.stages`` inside
``storage.stage_run`` (pair, spec, output folder, lineage; published on success), and turns the result into
metadata (counts, tables, preview grids).
"""

import dagster as dg

from assets.launchpad import (
    CharacterImagesAssetConfig,
    ClassImagesConfig,
    ReferencesConfig,
    SegmentsConfig,
    SegMixBankConfig,
)
from assets.metadata import grid_md, table_md
from assets.partitions import REFERENCES_FINGERPRINT
from assets.stage_asset import stage_asset
from pipeline.captions import CaptionCache
from pipeline.images import IntakeConfig
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import STATUS_OK, SegmentConfig
from pipeline.settings import resolve
from pipeline.stage_names import Stage
from pipeline.stages.captions import USER_BACKEND, run_captions, user_caption_files
from pipeline.stages.character_images import CharacterImagesConfig, run_character_images
from pipeline.stages.class_images import run_class_images
from pipeline.stages.references import run_references
from pipeline.stages.segments import run_segments
from pipeline.stages.segmix_bank import run_segmix_bank
from pipeline.storage.manifest import read_manifest
from pipeline.storage.registry import references_fingerprint
from resources import CaptionerResource, ModelResource, StorageResource


@stage_asset(
    Stage.CHARACTER_IMAGES,
    gpu=True,
    kinds={"pytorch", "parquet"},
    code_version="character-images-v1",
    description="Images of each character given as a LoRA file, rendered with its own LoRA (checked against the "
    "base model first); empty for characters given as photos.",
)
def character_images(
    context: dg.AssetExecutionContext,
    config: CharacterImagesAssetConfig,
    storage: StorageResource,
    models: ModelResource,
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    settings = resolve(config.settings(CharacterImagesConfig), preset)
    with storage.stage_run(context, Stage.CHARACTER_IMAGES) as run:
        manifest = run_character_images(
            spec=run.spec,
            load_pipeline=models.base_pipeline_factory(storage.layout.models),
            config=settings,
            out_dir=run.out_dir,
            recorder=run.recorder,
            base_model_id=preset.base_model,
        )
    loras = manifest.drop_duplicates("character_id")
    return dg.MaterializeResult(
        metadata={
            "images": len(manifest),
            "character_loras": table_md(loras[["character_id", "lora_format", "rank", "alpha", "lora_sha256"]]),
            "preview": grid_md(manifest["path"].tolist(), columns=5),
        }
    )


@stage_asset(
    Stage.REFERENCES,
    gpu=False,
    kinds={"python", "parquet"},
    code_version="references-v1",
    deps=[character_images],
    description="Validated, EXIF-oriented, de-duplicated RGB reference photos per character (plus the images "
    "rendered with a character's own LoRA).",
)
def references(
    context: dg.AssetExecutionContext, config: ReferencesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    intake = config.settings(IntakeConfig)
    with storage.stage_run(context, Stage.REFERENCES) as run:
        generated = None
        if any(c.lora for c in run.spec.characters):  # pairs of photos only need no character_images run
            generated = read_manifest(storage.input_dir(run.pair, Stage.CHARACTER_IMAGES), Stage.CHARACTER_IMAGES)
        out = run_references(
            spec=run.spec, out_dir=run.out_dir, config=intake, recorder=run.recorder, generated=generated
        )
    for row in out.rejected.itertuples():
        context.log.warning(f"Skipped {row.source} ({row.character_id}): {row.reason}")
    counts = out.manifest.groupby("character_id").size().to_dict()
    return dg.MaterializeResult(
        metadata={
            "accepted": len(out.manifest),
            "rejected": len(out.rejected),
            # The retraining schedule compares this with the spec's current photos (assets/schedules.py).
            REFERENCES_FINGERPRINT: references_fingerprint(run.spec),
            "per_character": dg.MetadataValue.json(counts),
            "rejected_files": table_md(out.rejected),
            "manifest": dg.MetadataValue.path(str(out.manifest_path)),
            "preview": grid_md(out.manifest["path"].tolist(), columns=5),
        }
    )


@stage_asset(
    Stage.SEGMENTS,
    gpu=True,
    kinds={"pytorch", "parquet"},
    code_version="segments-v1",
    deps=[references],
    description="Subject masks and RGBA cut-outs (user masks first, else OWLv2 → SAM or the chosen backend).",
)
def segments(
    context: dg.AssetExecutionContext, config: SegmentsConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    seg_config = config.settings(SegmentConfig)
    with storage.stage_run(context, Stage.SEGMENTS) as run:
        manifest = run_segments(
            references=read_manifest(storage.input_dir(run.pair, Stage.REFERENCES), Stage.REFERENCES),
            masks_dirs={c.id: c.masks_dir for c in run.spec.characters},
            out_dir=run.out_dir,
            load_segmenter=models.segmenter_factory(storage.layout.models, seg_config),
            config=seg_config,
            recorder=run.recorder,
            model_ids=models.segmenter_model_ids(),
            confine_to=run.spec.confined_to,
        )
    flagged = manifest[manifest["status"] != STATUS_OK]
    for row in flagged.itertuples():
        context.log.warning(f"{row.source}: {row.status} — supply a mask in the spec's 'masks' folder")
    usable = manifest[manifest["status"] == STATUS_OK]
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


@stage_asset(
    Stage.CAPTIONS,
    gpu=False,
    kinds={"python", "parquet"},
    code_version="captions-v1",
    deps=[references],
    description="One caption per reference with the token phrase in place of the class noun (cached).",
)
def captions(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    captioner: CaptionerResource,
    models: ModelResource,
) -> dg.MaterializeResult:
    with storage.stage_run(context, Stage.CAPTIONS) as run:
        refs = read_manifest(storage.input_dir(run.pair, Stage.REFERENCES), Stage.REFERENCES)
        backend = captioner.build(storage.layout.models, models.resolved_preset().vlm)
        manifest = run_captions(
            references=refs,
            out_dir=run.out_dir,
            captioner=backend,
            cache=CaptionCache(storage.layout.cache / "captions"),
            recorder=run.recorder,
            user_captions=user_caption_files(run.spec),
        )
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


@stage_asset(
    Stage.CLASS_IMAGES,
    gpu=True,
    kinds={"pytorch", "parquet"},
    code_version="class-images-v2",
    description="Prior-preservation images per class noun (generated by the base model or imported), segmented.",
)
def class_images(
    context: dg.AssetExecutionContext,
    config: ClassImagesConfig,
    storage: StorageResource,
    models: ModelResource,
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    generation = resolve(config.settings(ClassImageConfig), preset)
    seg_config = config.settings(SegmentConfig)
    with storage.stage_run(context, Stage.CLASS_IMAGES) as run:
        manifest = run_class_images(
            spec=run.spec,
            out_dir=run.out_dir,
            config=generation,
            load_pipeline=models.base_pipeline_factory(storage.layout.models),
            base_model_id=preset.base_model,
            load_segmenter=models.segmenter_factory(storage.layout.models, seg_config),
            segment_config=seg_config,
            recorder=run.recorder,
            segmenter_model_ids=models.segmenter_model_ids(),
        )
    usable = manifest[manifest["status"] == STATUS_OK]
    return dg.MaterializeResult(
        metadata={
            "images": len(manifest),
            "usable_cutouts": len(usable),
            "origins": dg.MetadataValue.json(manifest["origin"].str.split(":").str[0].value_counts().to_dict()),
            "base_model": preset.base_model,
            "preview": grid_md(manifest["path"].tolist()[:16], columns=8),
        }
    )


@stage_asset(
    Stage.SEGMIX_BANK,
    gpu=False,
    kinds={"python", "parquet"},
    code_version="segmix-bank-v1",
    deps=[segments, class_images],
    description="A seeded bank of Seg-Mix composites (MuDI Alg. 1) with union/visible masks, boxes and prompts.",
)
def segmix_bank(
    context: dg.AssetExecutionContext,
    config: SegMixBankConfig,
    storage: StorageResource,
    models: ModelResource,
) -> dg.MaterializeResult:
    bank = config.bank_config(models.resolved_preset())
    with storage.stage_run(context, Stage.SEGMIX_BANK) as run:
        segs = read_manifest(storage.input_dir(run.pair, Stage.SEGMENTS), Stage.SEGMENTS)
        prior_dir = storage.input_dir(run.pair, Stage.CLASS_IMAGES) if bank.n_prior else None
        out = run_segmix_bank(
            segments=segs,
            class_images=read_manifest(prior_dir, Stage.CLASS_IMAGES) if prior_dir is not None else None,
            character_nouns={c.id: c.class_noun for c in run.spec.characters},
            out_dir=run.out_dir,
            config=bank,
            recorder=run.recorder,
            relative_sizes=run.spec.relative_sizes,
        )
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
    return dg.MaterializeResult(metadata=metadata)
