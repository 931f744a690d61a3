"""Training and generation assets: lora (DreamBooth-LoRA with Seg-Mix and prior preservation) → samples."""

import dataclasses

import dagster as dg
from pydantic import Field

from assets.metadata import grid_md, image_md, loss_curve_md, table_md
from assets.pair_assets import captions, class_images, segments, segmix_bank
from assets.stage_asset import stage_asset
from pipeline.images import image_grid
from pipeline.infer import DEFAULT_NEGATIVE, scene_prompts
from pipeline.lora.versions import TrainingRun
from pipeline.rendering import RenderSettings, segmix_layout_factory
from pipeline.stage_names import Stage
from pipeline.stages.lora import ValidationRenders, current_lora, run_lora
from pipeline.stages.samples import run_samples
from pipeline.storage.manifest import read_manifest
from pipeline.train import TrainConfig
from pipeline.train.training_set import load_samples
from resources import ModelResource, StorageResource

# The stage folders load_samples reads (with S3 they are fetched first).
TRAINING_STAGES = (Stage.REFERENCES, Stage.CAPTIONS, Stage.SEGMENTS, Stage.SEGMIX_BANK, Stage.CLASS_IMAGES)


class LoraTrainingConfig(dg.Config):
    steps: int = 0
    """0 uses the preset's default (30 for tiny, 800 for sdxl)."""
    rank: int = 32
    alpha: float = 32.0
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    batch_size: int = 1
    segmix_p: float = 0.3
    segmix_draw: str = "shared"
    """shared (MuDI): one Seg-Mix draw for an instance image and its prior image; independent: one each."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (MuDI: batch 1 × 2); steps counts optimizer steps."""
    adam_weight_decay: float = 1e-4
    prior_weight: float = 1.0
    """0 disables prior preservation."""
    dco_beta: float = 0.0
    masked_loss: bool = False
    mask_normalization: str = "mean"
    train_text_encoder: bool = False
    mixed_precision: str = "auto"
    """auto: the dtype the models resource loads the base model in (fp16 on CUDA by default, no on CPU)."""
    gradient_checkpointing: bool = False
    compile_unet: bool = False
    """torch.compile the U-Net: faster steps after a one-off compile (minutes on a small CPU)."""
    use_8bit_adam: bool = False
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    resolution: int = 0
    """0 uses the preset's resolution."""
    validation_prompts: list[str] = Field(default_factory=list)
    """Empty: two of the default scene prompts with the characters' token phrases."""


class SamplesConfig(dg.Config):
    prompts: list[str] = Field(default_factory=list)
    """Empty: the default scene prompts filled with the token phrases."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    """Image k of every prompt uses seeds[k]."""
    gamma: float = 1.0
    """MuDI init weight; negative disables the layout init (plain noise)."""
    layout_seed_offset: int = 0
    lora_scale: float = 1.0
    use_default_negative: bool = True
    """Negative prompt "sticker, collage" against Seg-Mix sticker artefacts."""
    steps: int = 0
    guidance_scale: float = 5.0
    resolution: int = 0


@stage_asset(
    Stage.LORA,
    gpu=True,
    kinds={"pytorch", "safetensors"},
    code_version="lora-v2",
    deps=[captions, segments, segmix_bank, class_images],
    description="DreamBooth-LoRA on the U-Net with Seg-Mix and prior preservation; resumable; diffusers + kohya files.",
)
def lora(
    context: dg.AssetExecutionContext, config: LoraTrainingConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    # auto: train in the precision the frozen base model is loaded in (the resource's dtype).
    autocast = {"float16": "fp16", "bfloat16": "bf16"}.get(models.torch_dtype_name(), "no")
    mixed = config.mixed_precision if config.mixed_precision != "auto" else autocast
    # The launchpad fields mirror TrainConfig; only the preset-dependent defaults are resolved here.
    shared = {k: v for k, v in config.model_dump().items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    train_config = TrainConfig(
        **{
            **shared,
            "steps": config.steps or preset.train_steps,
            "resolution": config.resolution or preset.resolution,
            "mixed_precision": mixed,
        }
    )

    def log_progress(step: int, metrics: dict) -> None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        context.log.info(f"step {step}/{train_config.steps}: {shown}")

    with storage.stage_run(context, Stage.LORA) as run:
        training_data = storage.input_pair_dir(run.pair, *TRAINING_STAGES)
        samples = load_samples(training_data, with_prior=train_config.prior_preservation)
        pipe = models.base_pipeline_factory(storage.layout.models)()
        prompts = config.validation_prompts or scene_prompts([c.token_phrase for c in run.spec.characters])[:2]
        out = run_lora(
            pipe=pipe,
            samples=samples,
            config=train_config,
            run=TrainingRun(run.out_dir, storage.layout.cache / "train", run.recorder, preset.base_model, log_progress),
            validation=ValidationRenders(prompts=prompts, steps=preset.inference_steps),
            trainer=models.trainer(storage.layout.models),
        )
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
    return dg.MaterializeResult(metadata=metadata)


@stage_asset(
    Stage.SAMPLES,
    gpu=True,
    kinds={"pytorch", "parquet"},
    code_version="samples-v1",
    deps=[lora],
    description="The characters rendered together with the pair's LoRA, from MuDI's mean-shifted initialization.",
)
def samples(
    context: dg.AssetExecutionContext, config: SamplesConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    resolution = config.resolution or preset.resolution
    gamma = config.gamma if config.gamma >= 0 else None
    settings = RenderSettings(
        height=resolution,
        width=resolution,
        steps=config.steps or preset.inference_steps,
        guidance_scale=config.guidance_scale,
        negative_prompt=DEFAULT_NEGATIVE if config.use_default_negative else None,
        lora_scale=config.lora_scale,
    )
    with storage.stage_run(context, Stage.SAMPLES) as run:
        current = current_lora(storage.input_dir(run.pair, Stage.LORA))
        layout_factory = None
        if gamma is not None:
            segments_manifest = read_manifest(storage.input_dir(run.pair, Stage.SEGMENTS), Stage.SEGMENTS)
            layout_factory = segmix_layout_factory(segments_manifest, resolution, config.layout_seed_offset)
        manifest = run_samples(
            pipe=models.base_pipeline_factory(storage.layout.models)(),
            lora=current,
            prompts=config.prompts or scene_prompts([c.token_phrase for c in run.spec.characters]),
            seeds=list(config.seeds),
            layout_factory=layout_factory,
            gamma=gamma,
            settings=settings,
            out_dir=run.out_dir,
            recorder=run.recorder,
            model_ids=[preset.base_model],
        )
    return dg.MaterializeResult(
        metadata={
            "images": len(manifest),
            "lora_version": current.version,
            "gamma": gamma if gamma is not None else "plain noise",
            "prompts": table_md(manifest[["prompt", "seed", "layout_source"]].drop_duplicates().head(20)),
            "samples": grid_md(manifest["path"].head(16).tolist(), columns=4),
        }
    )
