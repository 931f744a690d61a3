"""Training and generation assets: lora (DreamBooth-LoRA with Seg-Mix and prior preservation) → samples."""

import dagster as dg

from assets.compute import gpu_step
from assets.launchpad import LoraTrainingConfig, LoraValidation, SamplesConfig, SamplesSettings
from assets.metadata import grid_md, image_md, loss_curve_md, table_md, user_errors
from assets.pair_assets import GROUP, captions, class_images, segments, segmix_bank
from assets.partitions import character_pairs, pair_key
from pipeline.images import image_grid
from pipeline.infer import scene_prompts
from pipeline.settings import resolve
from pipeline.stages.lora import current_lora, run_lora
from pipeline.stages.samples import run_samples, segmix_layout_factory
from pipeline.storage.manifest import read_manifest
from pipeline.train import TrainConfig
from pipeline.train.config import resolve_train_config
from pipeline.train.training_set import load_samples
from resources import ModelResource, StorageResource

# The stage folders load_samples reads (with S3 they are fetched first).
TRAINING_STAGES = ("references", "captions", "segments", "segmix_bank", "class_images")


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    deps=[captions, segments, segmix_bank, class_images],
    code_version="lora-v2",
    kinds={"pytorch", "safetensors"},
    **gpu_step(),
    description="DreamBooth-LoRA on the U-Net with Seg-Mix and prior preservation; resumable; diffusers + kohya files.",
)
@user_errors
def lora(
    context: dg.AssetExecutionContext, config: LoraTrainingConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    pair = pair_key(context)
    spec = storage.spec(pair)
    preset = models.resolved_preset()
    train_config = resolve_train_config(config.settings(TrainConfig), preset, models.torch_dtype_name())
    training_data = storage.input_pair_dir(pair, *TRAINING_STAGES)
    samples = load_samples(training_data, with_prior=train_config.prior_preservation)
    pipe = models.base_pipeline_factory(storage.layout.models)()
    phrases = [c.token_phrase for c in spec.characters]
    prompts = list(config.settings(LoraValidation).validation_prompts) or scene_prompts(phrases)[:2]
    recorder = storage.recorder(context)

    def log_progress(step: int, metrics: dict) -> None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        context.log.info(f"step {step}/{train_config.steps}: {shown}")

    out = run_lora(
        pipe,
        samples,
        train_config,
        storage.output_dir(pair, "lora"),
        storage.layout.cache / "train",
        recorder,
        preset.base_model,
        on_log=log_progress,
        validation_prompts=prompts,
        validation_steps=preset.inference_steps,
        trainer=models.trainer(storage.layout.models),
    )
    recorder.flush()
    result = out.result
    kinds = {kind: sum(s.kind == kind for s in samples) for kind in sorted({s.kind for s in samples})}
    metadata = {
        "version": out.version,
        "steps": result.steps_done,
        "resumed_from_step": result.resumed_from if result.resumed_from is not None else -1,
        "final_loss": float(result.final_loss) if result.final_loss is not None else float("nan"),
        "training_samples": dg.MetadataValue.json(kinds),
        "metrics": dg.MetadataValue.json({k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)}),
        "diffusers_file": dg.MetadataValue.path(str(out.files["diffusers"])),
        "kohya_file": dg.MetadataValue.path(str(out.files["kohya"])),
        "validation_prompts": dg.MetadataValue.md("\n".join(f"- {p}" for p, _ in out.validation) or "_none_"),
    }
    if result.losses:
        metadata["loss_curve"] = loss_curve_md(result.losses)
    if out.validation:
        metadata["validation_images"] = image_md(image_grid([image for _, image in out.validation], columns=4))
    storage.publish(context, pair, "lora")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    deps=[lora],
    code_version="samples-v1",
    kinds={"pytorch", "parquet"},
    **gpu_step(),
    description="The characters rendered together with the pair's LoRA, from MuDI's mean-shifted initialization.",
)
@user_errors
def samples(
    context: dg.AssetExecutionContext, config: SamplesConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    pair = pair_key(context)
    spec = storage.spec(pair)
    preset = models.resolved_preset()
    settings = resolve(config.settings(SamplesSettings), preset)
    lora_root = storage.input_dir(pair, "lora")
    current = current_lora(lora_root)
    pipe = models.base_pipeline_factory(storage.layout.models)()
    pipe.load_lora_weights(current["diffusers"])
    resolution = settings.resolution
    prompts = list(settings.prompts) or scene_prompts([c.token_phrase for c in spec.characters])
    gamma = settings.gamma
    layout_factory = None
    if gamma is not None:
        segments_manifest = read_manifest(storage.input_dir(pair, "segments"), "segments")
        layout_factory = segmix_layout_factory(segments_manifest, resolution, settings.layout_seed_offset)

    recorder = storage.recorder(context)
    manifest = run_samples(
        pipe,
        prompts,
        list(settings.seeds),
        len(settings.seeds),
        layout_factory,
        gamma,
        current["version"],
        storage.output_dir(pair, "samples"),
        recorder,
        resolution,
        resolution,
        settings.steps,
        settings.guidance_scale,
        settings.negative_prompt,
        lora_sha256=current["sha256"]["diffusers"],
        lora_scale=settings.lora_scale,
        model_ids=[preset.base_model],
    )
    recorder.flush()
    storage.publish(context, pair, "samples")
    return dg.MaterializeResult(
        metadata={
            "images": len(manifest),
            "lora_version": current["version"],
            "gamma": gamma if gamma is not None else "plain noise",
            "prompts": table_md(manifest[["prompt", "seed", "layout_source"]].drop_duplicates().head(20)),
            "samples": grid_md(manifest["path"].head(16).tolist(), columns=4),
        }
    )
