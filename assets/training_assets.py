"""Training and generation assets: lora (DreamBooth-LoRA with Seg-Mix and prior preservation) → samples."""

from typing import Any

import dagster as dg

from assets.launchpad import LoraTrainingConfig, LoraValidation, SamplesConfig, SamplesSettings
from assets.metadata import image_md, loss_curve_md, table_md
from assets.pair_assets import captions, class_images, segments, segmix_bank
from assets.stage_asset import stage_asset
from pipeline.images import image_grid
from pipeline.infer import DEFAULT_NEGATIVE, scene_prompts
from pipeline.layout_control import PromptEntry
from pipeline.lora.modular import ModularConfig
from pipeline.lora.versions import TrainingRun
from pipeline.rendering import RenderSettings, layout_grid, pair_layouts
from pipeline.settings import resolve
from pipeline.stage_names import Stage
from pipeline.stages.lora import ValidationRenders, current_lora, is_modular, run_lora, run_modular
from pipeline.stages.samples import run_samples
from pipeline.storage.manifest import read_manifest
from pipeline.train import TrainConfig
from pipeline.train.config import resolve_train_config
from pipeline.train.training_set import load_samples
from resources import CaptionerResource, ModelResource, StorageResource

# The stage folders load_samples reads (with S3 they are fetched first).
TRAINING_STAGES = (Stage.REFERENCES, Stage.CAPTIONS, Stage.SEGMENTS, Stage.SEGMIX_BANK, Stage.CLASS_IMAGES)


@stage_asset(
    Stage.LORA,
    gpu=True,
    kinds={"pytorch", "safetensors"},
    code_version="lora-v2",
    deps=[captions, segments, segmix_bank, class_images],
    description=(
        "DreamBooth-LoRA on the base model's denoiser (SDXL U-Net, FLUX.1 transformer) with Seg-Mix and prior "
        "preservation (or, for a pair of character LoRA files, their merge fine-tuned with Seg-Mix); resumable; "
        "diffusers + kohya files."
    ),
)
def lora(
    context: dg.AssetExecutionContext, config: LoraTrainingConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    train_config = resolve_train_config(config.settings(TrainConfig), preset, models.torch_dtype_name())

    def log_progress(step: int, metrics: dict) -> None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        context.log.info(f"step {step}/{train_config.steps}: {shown}")

    with storage.stage_run(context, Stage.LORA) as run:
        training_data = storage.input_pair_dir(run.pair, *TRAINING_STAGES)
        samples = load_samples(training_data, with_prior=train_config.prior_preservation)
        prompts = (
            list(config.settings(LoraValidation).validation_prompts)
            or scene_prompts([c.token_phrase for c in run.spec.characters])[:2]
        )
        training_run = TrainingRun(
            run.out_dir, storage.layout.cache / "train", run.recorder, preset.base_model, log_progress
        )
        validation = ValidationRenders(
            prompts=prompts, steps=preset.inference_steps, guidance_scale=preset.guidance_scale
        )
        merge_metadata: dict[str, Any] = {}
        if is_modular(run.spec.characters):  # every character given as its own LoRA: merge + Seg-Mix fine-tune
            modular = config.settings(ModularConfig)
            merged = run_modular(
                pipe_factory=models.base_pipeline_factory(storage.layout.models),
                characters=run.spec.characters,
                samples=samples,
                config=train_config,
                modular=modular,
                run=training_run,
                validation=validation,
                trainer=models.trainer(storage.layout.models),
            )
            out = merged.finetuned
            merge_metadata = {
                "merge_method": merged.merge.method,
                "merged_version": merged.merged.version,
                "naive_merge_version": merged.naive.version,
                "merge_details": dg.MetadataValue.json(merged.merge.details),
                "character_loras": dg.MetadataValue.json(list(merged.merge.sources)),
            }
        else:
            out = run_lora(
                pipe=models.base_pipeline_factory(storage.layout.models)(),
                samples=samples,
                config=train_config,
                run=training_run,
                validation=validation,
                trainer=models.trainer(storage.layout.models),
            )
    result = out.result
    kinds = {kind: sum(s.kind == kind for s in samples) for kind in sorted({s.kind for s in samples})}
    metadata = {
        "version": out.version,
        # Which model this LoRA is for: a user who switched the launchpad's preset sees it took effect.
        "family": preset.family,
        "base_model": preset.base_model,
        "steps": result.steps_done,
        "resumed_from_step": result.resumed_from if result.resumed_from is not None else -1,
        "final_loss": float(result.final_loss) if result.final_loss is not None else float("nan"),
        "training_samples": dg.MetadataValue.json(kinds),
        "metrics": dg.MetadataValue.json({k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)}),
        "diffusers_file": dg.MetadataValue.path(str(out.files["diffusers"])),
        "kohya_file": dg.MetadataValue.path(str(out.files["kohya"])),
        "validation_prompts": dg.MetadataValue.md("\n".join(f"- {p}" for p, _ in out.validation) or "_none_"),
        **merge_metadata,
    }
    if result.losses:
        metadata["loss_curve"] = loss_curve_md(result.losses)
    if out.validation:
        metadata["validation_images"] = image_md(image_grid([image for _, image in out.validation], columns=4))
    return dg.MaterializeResult(metadata=metadata)


@stage_asset(
    Stage.SAMPLES,
    gpu=True,
    kinds={"pytorch", "parquet"},
    code_version="samples-v2",
    deps=[lora],
    description="The characters rendered together with the pair's LoRA, from MuDI's mean-shifted initialization.",
)
def samples(
    context: dg.AssetExecutionContext,
    config: SamplesConfig,
    storage: StorageResource,
    models: ModelResource,
    captioner: CaptionerResource,
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    chosen = resolve(config.settings(SamplesSettings), preset)
    resolution, gamma = chosen.resolution, chosen.gamma
    settings = RenderSettings(
        height=resolution,
        width=resolution,
        steps=chosen.steps,
        guidance_scale=chosen.guidance_scale,
        negative_prompt=DEFAULT_NEGATIVE if chosen.use_default_negative else None,
        lora_scale=chosen.lora_scale,
        true_cfg_scale=chosen.true_cfg_scale,
    )
    with storage.stage_run(context, Stage.SAMPLES) as run:
        characters = run.spec.characters
        # Every prompt's layout is checked against the pair before anything is loaded or rendered.
        entries = chosen.prompt_entries([c.id for c in characters]) or [
            PromptEntry(p) for p in scene_prompts([c.token_phrase for c in characters])
        ]
        wants_llm = any(e.layout.mode == "llm" for e in entries)
        layout_client = captioner.layout_client() if wants_llm and gamma is not None else None
        current = current_lora(storage.input_dir(run.pair, Stage.LORA))
        layouts = None
        if gamma is not None:
            segments_manifest = read_manifest(storage.input_dir(run.pair, Stage.SEGMENTS), Stage.SEGMENTS)
            layouts = pair_layouts(segments_manifest, resolution, chosen.layout_seed_offset, run.spec.relative_sizes)
        manifest = run_samples(
            pipe=models.base_pipeline_factory(storage.layout.models)(),
            lora=current,
            prompts=entries,
            seeds=list(chosen.seeds),
            layouts=layouts,
            gamma=gamma,
            settings=settings,
            out_dir=run.out_dir,
            recorder=run.recorder,
            model_ids=[preset.base_model],
            layout_client=layout_client,
            llm_retries=chosen.llm_layout_retries,
        )
    warnings = sorted(w for w in set(manifest["layout_warning"]) if w)
    for warning in warnings:
        context.log.warning(warning)
    return dg.MaterializeResult(
        metadata={
            "images": len(manifest),
            "lora_version": current.version,
            "gamma": gamma if gamma is not None else "plain noise",
            "prompts": table_md(manifest[["prompt", "seed", "layout_origin", "layout_source"]].head(20)),
            "samples": image_md(layout_grid(manifest, columns=4)),
            "layout_warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in warnings) or "_none_"),
        }
    )
