"""Quality assets: iteration (self-generation filtered by Detect-and-Compare) → evaluation (variants side by side)."""

import functools

import dagster as dg

from assets.compute import gpu_step
from assets.launchpad import (
    EvaluationAssetConfig,
    EvaluationSettings,
    IterationAssetConfig,
    IterationRun,
    RenderSettings,
)
from assets.metadata import image_md, user_errors
from assets.pair_assets import GROUP
from assets.partitions import DNC_HEADLINE, character_pairs, pair_key
from assets.training_assets import TRAINING_STAGES, lora
from pipeline.dnc.pair_scorer import references_from_manifest
from pipeline.errors import CastloraError
from pipeline.evaluation.draw import annotated_grid
from pipeline.evaluation.report import headline_values, plot_rounds, rounds_markdown, training_markdown
from pipeline.infer import scene_prompts
from pipeline.iteration_rules import CONVERGENCE_KEPT_RATIO, IterationConfig
from pipeline.settings import resolve
from pipeline.stages.evaluation import (
    Subject,
    Variant,
    image_reward_note,
    run_evaluation,
    train_baseline,
)
from pipeline.stages.iteration import GenerationSettings, current_iteration, run_iteration
from pipeline.stages.lora import current_lora, train_config_of
from pipeline.stages.samples import segmix_layout_factory
from pipeline.storage.manifest import read_manifest
from pipeline.train.training_set import load_samples
from resources import ModelResource, StorageResource


def _generation(storage, models, pair, render: RenderSettings, prompts, seed=0) -> GenerationSettings:
    spec = storage.spec(pair)
    render = resolve(render, models.resolved_preset())
    return GenerationSettings(
        prompts=tuple(prompts or scene_prompts([c.token_phrase for c in spec.characters])),
        resolution=render.resolution,
        steps=render.inference_steps,
        guidance_scale=render.guidance_scale,
        negative_prompt=render.negative_prompt,
        seed=seed,
    )


def _scorer(storage: StorageResource, models: ModelResource, pair: str):
    spec = storage.spec(pair)
    references = read_manifest(storage.input_dir(pair, "references"), "references")
    subjects = references_from_manifest(references, [c.id for c in spec.characters])
    return models.dnc_scorer(subjects, storage.layout.models)


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    deps=[lora],
    code_version="iteration-v2",
    kinds={"pytorch", "parquet"},
    **gpu_step(),
    description="Iterative self-generation: render, score with Detect-and-Compare, keep the best, fine-tune with KL "
    "towards the previous round; stops when the identities converge.",
)
@user_errors
def iteration(
    context: dg.AssetExecutionContext, config: IterationAssetConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    pair = pair_key(context)
    preset = models.resolved_preset()
    base = current_lora(storage.input_dir(pair, "lora"))
    loop_config = resolve(config.settings(IterationConfig), preset)
    render, run = config.settings(RenderSettings), config.settings(IterationRun)
    generation = _generation(storage, models, pair, render, render.prompts, run.seed)
    segments = read_manifest(storage.input_dir(pair, "segments"), "segments")
    scorer = _scorer(storage, models, pair)
    recorder = storage.recorder(context)
    out = run_iteration(
        models.base_pipeline_factory(storage.layout.models),
        base,
        scorer,
        segmix_layout_factory(segments, generation.resolution),
        generation,
        loop_config,
        train_config_of(base),
        storage.output_dir(pair, "iteration"),
        storage.layout.cache / "train",
        recorder,
        preset.base_model,
        rounds_per_run=run.rounds_per_run,
        on_log=lambda step, m: context.log.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items())),
        log=context.log.info,
    )
    recorder.flush()
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
        "best_lora": dg.MetadataValue.path(str(out.best_lora["diffusers"])),
        "rounds": dg.MetadataValue.md(rounds_markdown(out.rounds)),
        "dnc_per_round": image_md(_open(plot), "D&C per round"),
        "detector": scorer.detector.label,
        "embedders": ", ".join(scorer.embedders) or "none",
        "unavailable_embedders": dg.MetadataValue.json(scorer.unavailable),
        "config": dg.MetadataValue.json(loop_config.as_record()),
    }
    if kept_items:
        metadata["kept_images"] = image_md(annotated_grid(kept_items, columns=4, cell_size=192), "kept")
    storage.publish(context, pair, "iteration")
    return dg.MaterializeResult(metadata=metadata)


def _samples_for(training_data, config):
    return load_samples(training_data, with_prior=config.prior_preservation)


def _open(path):
    from PIL import Image

    with Image.open(path) as opened:
        return opened.convert("RGB")


@dg.asset(
    partitions_def=character_pairs,
    group_name=GROUP,
    deps=[lora, iteration],
    code_version="evaluation-v2",
    kinds={"pytorch", "parquet"},
    **gpu_step(),
    description="DreamBooth vs Seg-Mix vs + MuDI init vs + iterative training on one prompt × seed grid: D&C (both "
    "modes), DINO / CLIP-I per character, CLIP-T, count-gate failures; report, plots and annotated grids.",
)
@user_errors
def evaluation(
    context: dg.AssetExecutionContext, config: EvaluationAssetConfig, storage: StorageResource, models: ModelResource
) -> dg.MaterializeResult:
    pair = pair_key(context)
    spec = storage.spec(pair)
    preset = models.resolved_preset()
    settings, render = config.settings(EvaluationSettings), config.settings(RenderSettings)
    prompts = list(render.prompts) or scene_prompts([c.token_phrase for c in spec.characters])[: preset.eval_prompts]
    seeds = list(settings.seeds) or list(range(1000, 1000 + preset.eval_seeds))
    generation = _generation(storage, models, pair, render, prompts)
    pipe_factory = models.base_pipeline_factory(storage.layout.models)
    lora_root = storage.input_dir(pair, "lora")
    segmix_lora = current_lora(lora_root)
    recorder = storage.recorder(context)
    iteration_root = storage.input_dir(pair, "iteration")
    evaluation_dir = storage.output_dir(pair, "evaluation")
    variants, notes, rounds, baseline = [], [], None, None
    for name in settings.variants:
        if name == "dreambooth":
            context.log.info("evaluation: training the DreamBooth baseline (the Seg-Mix LoRA's settings, no Seg-Mix)")
            training_data = storage.input_pair_dir(pair, *TRAINING_STAGES)
            baseline = train_baseline(
                pipe_factory(), segmix_lora, functools.partial(_samples_for, training_data),
                evaluation_dir, storage.layout.cache / "train", recorder, preset.base_model,
            )  # fmt: skip
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
            note = f"iterative: best round {iterated['round']} of run {iterated['run']} ({iterated['stop_reason']})"
            variants.append(Variant(name, iterated, settings.gamma, note))
            rounds = read_manifest(iteration_root / iterated["run"], "iteration", "rounds.parquet")
    scorer = _scorer(storage, models, pair)
    clip_t, clip_t_note = models.clip_t_scorer(storage.layout.models, scorer)
    segments = read_manifest(storage.input_dir(pair, "segments"), "segments")
    out = run_evaluation(
        pipe_factory,
        variants,
        scorer,
        scorer.unavailable,
        clip_t,
        clip_t_note,
        image_reward_note(preset.image_reward),
        segmix_layout_factory(segments, generation.resolution),
        generation,
        seeds,
        [Subject(c.id, c.class_noun, c.token_phrase) for c in spec.characters],
        evaluation_dir,
        recorder,
        preset.base_model,
        rounds=rounds,
        log=context.log.info,
        title=f"castlora evaluation — {pair}",
        notes=[*notes, f"detector: {scorer.detector.label}"],
        segmix_lora=segmix_lora,
    )
    recorder.flush()
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
    storage.publish(context, pair, "evaluation")  # the baseline LoRA is inside the evaluation folder
    return dg.MaterializeResult(metadata=metadata)
