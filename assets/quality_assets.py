"""Quality assets: iteration (self-generation filtered by Detect-and-Compare) → evaluation (variants side by side)."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.metadata import image_md
from assets.partitions import DNC_HEADLINE
from assets.stage_asset import stage_asset
from assets.training_assets import TRAINING_STAGES, lora
from pipeline.dnc.pair_scorer import references_from_manifest
from pipeline.errors import CastloraError
from pipeline.evaluation.draw import annotated_grid
from pipeline.evaluation.report import headline_values, plot_rounds, rounds_markdown, training_markdown
from pipeline.infer import DEFAULT_NEGATIVE, scene_prompts
from pipeline.iteration_rules import CONVERGENCE_KEPT_RATIO, IterationConfig
from pipeline.lora.record import LoraRecord
from pipeline.lora.versions import LoraOutput
from pipeline.rendering import GenerationSettings, segmix_layout_factory
from pipeline.spec import PairSpec
from pipeline.stage_names import Stage
from pipeline.stages.evaluation import (
    VARIANTS,
    EvaluationReport,
    EvaluationScoring,
    Subject,
    Variant,
    image_reward_note,
    run_evaluation,
    train_baseline,
)
from pipeline.stages.iteration import ROUNDS_FILE, current_iteration, run_iteration
from pipeline.stages.lora import current_lora
from pipeline.storage.manifest import read_manifest
from pipeline.train.training_set import load_samples
from resources import ModelResource, StorageResource
from resources.storage import StageRun


class IterationAssetConfig(dg.Config):
    images_per_round: int = 0
    """0: the preset's (200 for sdxl, as MuDI)."""
    keep_top: int = 0
    """0: the preset's (50 for sdxl)."""
    min_dnc: float | None = None
    """Kept images must also reach this D&C; empty: the count gate only."""
    train_steps: int = 0
    """0: the preset's (1000 for sdxl)."""
    kl_weight: float = 1.0
    max_rounds: int = 0
    """0: the preset's (5 for sdxl; 2 for tiny: one fine-tune, then its check)."""
    rounds_per_run: int = 0
    """0: run until the loop stops; 1: one round per materialization (the next one continues)."""
    distance_fraction: float = 0.8
    """``kept_ratio`` rule: converged when the kept set's distance < this × round 0's."""
    convergence: str = "kept_ratio"
    """``kept_ratio`` (kept set vs round 0) or ``per_prompt`` (The Chosen One: every prompt's images closer than
    ``d_conv``)."""
    d_conv: float | None = None
    """``per_prompt`` rule's absolute threshold (mean pairwise Euclidean distance of unit embeddings, 0-2)."""
    min_improvement: float = 0.0
    gamma: float = 1.0
    dnc_mode: str = "default"
    dnc_embedder: str = "dinov2"
    preference: bool = False
    """IdGlow-style Diffusion-DPO on (best, worst) pairs of each prompt after the KL fine-tune."""
    dpo_beta: float = 5000.0
    dpo_steps: int = 200
    preference_margin: float = 0.05
    prompts: list[str] = Field(default_factory=list)
    """Empty: the default scene prompts with the characters' token phrases."""
    inference_steps: int = 0
    guidance_scale: float = 5.0
    use_default_negative: bool = True
    seed: int = 0
    resolution: int = 0
    """0: the preset's resolution."""


class EvaluationAssetConfig(dg.Config):
    variants: list[str] = Field(default_factory=lambda: list(VARIANTS))
    """Any of dreambooth (LoRA without Seg-Mix, trained here), segmix, segmix_init, iterative."""
    prompts: list[str] = Field(default_factory=list)
    """Empty: the preset's number of default scene prompts."""
    seeds: list[int] = Field(default_factory=list)
    """Empty: the preset's number of seeds from 1000."""
    gamma: float = 1.0
    inference_steps: int = 0
    guidance_scale: float = 5.0
    use_default_negative: bool = True
    resolution: int = 0
    """0: the preset's resolution."""


def _generation(spec: PairSpec, models: ModelResource, config, prompts, seed=0) -> GenerationSettings:
    preset = models.resolved_preset()
    return GenerationSettings(
        prompts=tuple(prompts or scene_prompts([c.token_phrase for c in spec.characters])),
        resolution=config.resolution or preset.resolution,
        steps=config.inference_steps or preset.inference_steps,
        guidance_scale=config.guidance_scale,
        negative_prompt=DEFAULT_NEGATIVE if config.use_default_negative else None,
        seed=seed,
    )


def _scorer(storage: StorageResource, models: ModelResource, pair: str, spec: PairSpec):
    references = read_manifest(storage.input_dir(pair, Stage.REFERENCES), Stage.REFERENCES)
    subjects = references_from_manifest(references, [c.id for c in spec.characters])
    return models.dnc_scorer(subjects, storage.layout.models)


def _layout_factory(storage: StorageResource, pair: str, resolution: int):
    """MuDI init's layouts, made from the pair's cut-outs (the same for every round and variant)."""
    segments = read_manifest(storage.input_dir(pair, Stage.SEGMENTS), Stage.SEGMENTS)
    return segmix_layout_factory(segments, resolution)


@stage_asset(
    Stage.ITERATION,
    gpu=True,
    kinds={"pytorch", "parquet"},
    code_version="iteration-v2",
    deps=[lora],
    description="Iterative self-generation: render, score with Detect-and-Compare, keep the best, fine-tune with KL "
    "towards the previous round; stops when the identities converge.",
)
def iteration(
    context: dg.AssetExecutionContext, config: IterationAssetConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    # The launchpad fields mirror IterationConfig; only the preset-dependent defaults are resolved here.
    shared = {
        k: v for k, v in config.model_dump().items() if k in {f.name for f in dataclasses.fields(IterationConfig)}
    }
    loop_config = IterationConfig(
        **{
            **shared,
            "images_per_round": config.images_per_round or preset.iteration_images,
            "keep_top": config.keep_top or preset.iteration_keep,
            "train_steps": config.train_steps or preset.iteration_steps,
            "max_rounds": config.max_rounds or preset.iteration_rounds,
        }
    )
    with storage.stage_run(context, Stage.ITERATION) as run:
        base = current_lora(storage.input_dir(run.pair, Stage.LORA))
        generation = _generation(run.spec, models, config, config.prompts, config.seed)
        scorer = _scorer(storage, models, run.pair, run.spec)
        out = run_iteration(
            pipe_factory=models.base_pipeline_factory(storage.layout.models),
            base_lora=base,
            scorer=scorer,
            layout_factory=_layout_factory(storage, run.pair, generation.resolution),
            generation=generation,
            config=loop_config,
            train_config=base.train_config(),
            root=run.out_dir,
            cache_dir=storage.layout.cache / "train",
            recorder=run.recorder,
            base_model_id=preset.base_model,
            rounds_per_run=config.rounds_per_run,
            on_log=lambda step, m: context.log.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items())),
            log=context.log.info,
        )
        threshold = loop_config.distance_fraction if loop_config.convergence == CONVERGENCE_KEPT_RATIO else None
        plot = plot_rounds(out.rounds, out.run_dir / "rounds.png", distance_threshold=threshold)
    kept_items = [
        (_open(row["image_path"]), [], [], f"D&C {row['score']:.3f} s{row['seed']}")
        for row in out.kept.head(8).to_dict("records")
    ]
    metadata = {
        "rounds_done": len(out.history),
        "best_round": out.best_round,
        "stop_reason": out.stop_reason or "running",
        "convergence_rule": loop_config.convergence,
        "best_lora": dg.MetadataValue.path(str(out.best_lora.diffusers)),
        "rounds": dg.MetadataValue.md(rounds_markdown(out.rounds)),
        "dnc_per_round": image_md(_open(plot), "D&C per round"),
        "detector": scorer.detector.label,
        "embedders": ", ".join(scorer.embedders) or "none",
        "unavailable_embedders": dg.MetadataValue.json(scorer.unavailable),
        "config": dg.MetadataValue.json(loop_config.as_record()),
    }
    if kept_items:
        metadata["kept_images"] = image_md(annotated_grid(kept_items, columns=4, cell_size=192), "kept")
    return dg.MaterializeResult(metadata=metadata)


def _samples_for(training_data, config):
    return load_samples(training_data, with_prior=config.prior_preservation)


def _open(path):
    from PIL import Image

    with Image.open(path) as opened:
        return opened.convert("RGB")


def _variants(
    context: dg.AssetExecutionContext,
    config: EvaluationAssetConfig,
    storage: StorageResource,
    run: StageRun,
    segmix_lora: LoraRecord,
    pipe_factory: Callable[[], Any],
    base_model_id: str,
) -> tuple[list[Variant], list[str], pd.DataFrame | None, LoraOutput | None]:
    """The configured variants (training the DreamBooth baseline when asked), notes for the report, the iteration's
    rounds (for the report's plot) and the baseline's training output (None when not evaluated)."""
    iteration_root = storage.input_dir(run.pair, Stage.ITERATION)
    variants, notes, rounds, baseline = [], [], None, None
    for name in config.variants:
        if name == "dreambooth":
            context.log.info("evaluation: training the DreamBooth baseline (the Seg-Mix LoRA's settings, no Seg-Mix)")
            training_data = storage.input_pair_dir(run.pair, *TRAINING_STAGES)
            # A declared output of this asset: <evaluation>/baseline/<version>/, published with the stage.
            baseline = train_baseline(
                pipe=pipe_factory(),
                segmix_lora=segmix_lora,
                samples_for=functools.partial(_samples_for, training_data),
                out_dir=run.out_dir,
                cache_dir=storage.layout.cache / "train",
                recorder=run.recorder,
                base_model_id=base_model_id,
            )
            note = "dreambooth: the Seg-Mix LoRA's training settings without Seg-Mix (segmix_p=0)"
            variants.append(Variant(name, baseline.as_current(), None, note))
        elif name == "segmix":
            variants.append(Variant(name, segmix_lora, None))
        elif name == "segmix_init":
            variants.append(Variant(name, segmix_lora, config.gamma, f"segmix_init: MuDI init with γ={config.gamma}"))
        else:
            try:
                iterated = current_iteration(iteration_root)
            except CastloraError as exc:  # reported; the other variants still run
                notes.append(f"iterative: skipped ({exc})")
                continue
            pick = iterated.picked
            note = f"iterative: best round {pick.round} of run {pick.run} ({pick.stop_reason})"
            variants.append(Variant(name, iterated, config.gamma, note))
            rounds = read_manifest(iteration_root / pick.run, Stage.ITERATION, ROUNDS_FILE)
    return variants, notes, rounds, baseline


@stage_asset(
    Stage.EVALUATION,
    gpu=True,
    kinds={"pytorch", "parquet"},
    code_version="evaluation-v2",
    deps=[lora, iteration],
    description="DreamBooth vs Seg-Mix vs + MuDI init vs + iterative training on one prompt × seed grid: D&C (both "
    "modes), DINO / CLIP-I per character, CLIP-T, count-gate failures; report, plots and annotated grids.",
)
def evaluation(
    context: dg.AssetExecutionContext, config: EvaluationAssetConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    preset = models.resolved_preset()
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown:
        raise dg.Failure(f"Unknown evaluation variant(s) {unknown}; choose from {list(VARIANTS)}.")
    with storage.stage_run(context, Stage.EVALUATION) as run:
        characters = run.spec.characters
        prompts = config.prompts or scene_prompts([c.token_phrase for c in characters])[: preset.eval_prompts]
        seeds = list(config.seeds) or list(range(1000, 1000 + preset.eval_seeds))
        generation = _generation(run.spec, models, config, prompts)
        pipe_factory = models.base_pipeline_factory(storage.layout.models)
        segmix_lora = current_lora(storage.input_dir(run.pair, Stage.LORA))
        variants, notes, rounds, baseline = _variants(
            context, config, storage, run, segmix_lora, pipe_factory, preset.base_model
        )
        scorer = _scorer(storage, models, run.pair, run.spec)
        clip_t, clip_t_note = models.clip_t_scorer(storage.layout.models, scorer)
        out = run_evaluation(
            pipe_factory=pipe_factory,
            variants=variants,
            scoring=EvaluationScoring(
                scorer=scorer,
                unavailable_embedders=scorer.unavailable,
                clip_text_image=clip_t,
                clip_t_note=clip_t_note,
                image_reward_note=image_reward_note(preset.image_reward),
            ),
            layout_factory=_layout_factory(storage, run.pair, generation.resolution),
            generation=generation,
            seeds=seeds,
            subjects=[Subject(c.id, c.class_noun, c.token_phrase) for c in characters],
            out_dir=run.out_dir,
            recorder=run.recorder,
            base_model_id=preset.base_model,
            report=EvaluationReport(
                title=f"castlora evaluation — {run.pair}",
                notes=[*notes, f"detector: {scorer.detector.label}"],
                rounds=rounds,
                segmix_lora=segmix_lora,
            ),
            log=context.log.info,
        )
    metadata = {
        "report": dg.MetadataValue.md(out.report),
        "metrics_file": dg.MetadataValue.path(str(out.folder / "metrics.parquet")),
        "images_per_variant": len(prompts) * len(seeds),
        "variants": ", ".join(v.name for v in variants),
        "training_settings": dg.MetadataValue.md(training_markdown(out.training)),
    }
    if baseline is not None:  # a declared output of this asset, not a side folder
        metadata["baseline_version"] = baseline.version
        metadata["baseline_lora"] = dg.MetadataValue.path(str(baseline.files["diffusers"]))
        metadata["baseline_files"] = dg.MetadataValue.json({k: str(p) for k, p in baseline.files.items()})
        metadata["baseline_sha256"] = dg.MetadataValue.json(baseline.sha256s)
        metadata["baseline_train_config"] = dg.MetadataValue.json(baseline.config.as_record())
    found = headline_values(out.summary)
    if found is not None:
        # The `dnc_not_regressed` check compares this with the previous materialization's.
        metric, values = found
        metadata[DNC_HEADLINE] = dg.MetadataValue.json({"metric": metric, "values": values})
    for name, path in out.grids.items():
        metadata[f"grid_{name}"] = image_md(_open(path), name)
    for name, path in out.plots.items():
        metadata[f"plot_{name.replace(':', '_')}"] = image_md(_open(path), name)
    return dg.MaterializeResult(metadata=metadata)
