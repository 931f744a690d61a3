"""Quality assets: iteration (self-generation filtered by Detect-and-Compare) → evaluation (variants side by side)."""

import functools
from collections.abc import Callable
from typing import Any

import dagster as dg
import pandas as pd

from assets.launchpad import (
    EvaluationAssetConfig,
    EvaluationSettings,
    IterationAssetConfig,
    IterationRun,
    QualityRenderSettings,
)
from assets.metadata import image_md
from assets.partitions import DNC_HEADLINE
from assets.stage_asset import stage_asset
from assets.training_assets import TRAINING_STAGES, lora
from pipeline.dnc.pair_scorer import references_from_manifest
from pipeline.errors import CastloraError
from pipeline.evaluation.draw import annotated_grid
from pipeline.evaluation.report import headline_values, plot_rounds, rounds_markdown, training_markdown
from pipeline.infer import scene_prompts
from pipeline.iteration_rules import CONVERGENCE_KEPT_RATIO, IterationConfig
from pipeline.lora.modular import merge_method, read_modular
from pipeline.lora.record import LoraRecord
from pipeline.lora.versions import LoraOutput, TrainingRun
from pipeline.rendering import GenerationSettings, segmix_layout_factory
from pipeline.settings import resolve
from pipeline.spec import PairSpec
from pipeline.stage_names import Stage
from pipeline.stages.evaluation import (
    MODULAR_VARIANTS,
    EvaluationReport,
    EvaluationScoring,
    Subject,
    Variant,
    image_reward_note,
    modular_variants,
    run_evaluation,
    train_baseline,
)
from pipeline.stages.iteration import ROUNDS_FILE, current_iteration, run_iteration
from pipeline.stages.lora import current_lora
from pipeline.storage.manifest import read_manifest
from pipeline.train.training_set import load_samples
from resources import ModelResource, StorageResource
from resources.storage import StageRun


def _generation(
    spec: PairSpec, models: ModelResource, render: QualityRenderSettings, prompts, seed=0
) -> GenerationSettings:
    render = resolve(render, models.resolved_preset())
    return GenerationSettings(
        prompts=tuple(prompts or scene_prompts([c.token_phrase for c in spec.characters])),
        resolution=render.resolution,
        steps=render.inference_steps,
        guidance_scale=render.guidance_scale,
        negative_prompt=render.negative_prompt,
        seed=seed,
        true_cfg_scale=render.true_cfg_scale,
    )


def _scorer(storage: StorageResource, models: ModelResource, pair: str, spec: PairSpec):
    references = read_manifest(storage.input_dir(pair, Stage.REFERENCES), Stage.REFERENCES)
    subjects = references_from_manifest(references, [c.id for c in spec.characters])
    return models.dnc_scorer(subjects, storage.layout.models)


def _layout_factory(storage: StorageResource, pair: str, resolution: int, spec: PairSpec):
    """MuDI init's layouts, made from the pair's cut-outs (the same for every round and variant), with the
    spec's relative sizes."""
    segments = read_manifest(storage.input_dir(pair, Stage.SEGMENTS), Stage.SEGMENTS)
    return segmix_layout_factory(segments, resolution, relative_sizes=spec.relative_sizes)


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
    loop_config = resolve(config.settings(IterationConfig), preset)
    render, iteration_run = config.settings(QualityRenderSettings), config.settings(IterationRun)
    with storage.stage_run(context, Stage.ITERATION) as run:
        base = current_lora(storage.input_dir(run.pair, Stage.LORA))
        generation = _generation(run.spec, models, render, render.prompts, iteration_run.seed)
        scorer = _scorer(storage, models, run.pair, run.spec)
        out = run_iteration(
            pipe_factory=models.base_pipeline_factory(storage.layout.models),
            base_lora=base,
            scorer=scorer,
            layout_factory=_layout_factory(storage, run.pair, generation.resolution, run.spec),
            generation=generation,
            config=loop_config,
            train_config=base.train_config(),
            run=TrainingRun(
                lora_root=run.out_dir,
                cache_dir=storage.layout.cache / "train",
                recorder=run.recorder,
                base_model_id=preset.base_model,
                on_log=lambda step, m: context.log.info(
                    f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items())
                ),
            ),
            rounds_per_run=iteration_run.rounds_per_run,
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
    settings: EvaluationSettings,
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
    for name in settings.variants:
        if name in MODULAR_VARIANTS:
            continue  # below, from the lora stage's merge records
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
            variants.append(
                Variant(name, segmix_lora, settings.gamma, f"segmix_init: MuDI init with γ={settings.gamma}")
            )
        else:
            try:
                iterated = current_iteration(iteration_root)
            except CastloraError as exc:  # reported; the other variants still run
                notes.append(f"iterative: skipped ({exc})")
                continue
            pick = iterated.picked
            note = f"iterative: best round {pick.round} of run {pick.run} ({pick.stop_reason})"
            variants.append(Variant(name, iterated, settings.gamma, note))
            rounds = read_manifest(iteration_root / pick.run, Stage.ITERATION, ROUNDS_FILE)
    lora_root = storage.input_dir(run.pair, Stage.LORA)
    merged, merge_notes = modular_variants(
        settings.variants, read_modular(lora_root), segmix_lora, merge_method(lora_root)
    )
    return [*variants, *merged], [*notes, *merge_notes], rounds, baseline


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
    settings, render = config.settings(EvaluationSettings), config.settings(QualityRenderSettings)
    with storage.stage_run(context, Stage.EVALUATION) as run:
        characters = run.spec.characters
        prompts = list(render.prompts) or scene_prompts([c.token_phrase for c in characters])[: preset.eval_prompts]
        seeds = list(settings.seeds) or list(range(1000, 1000 + preset.eval_seeds))
        generation = _generation(run.spec, models, render, prompts)
        pipe_factory = models.base_pipeline_factory(storage.layout.models)
        segmix_lora = current_lora(storage.input_dir(run.pair, Stage.LORA))
        variants, notes, rounds, baseline = _variants(
            context, settings, storage, run, segmix_lora, pipe_factory, preset.base_model
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
            layout_factory=_layout_factory(storage, run.pair, generation.resolution, run.spec),
            generation=generation,
            seeds=seeds,
            subjects=[Subject(c.id, c.class_noun, c.token_phrase) for c in characters],
            out_dir=run.out_dir,
            recorder=run.recorder,
            base_model_id=preset.base_model,
            family=preset.family,
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
