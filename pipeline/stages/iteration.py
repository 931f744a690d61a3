"""Stage: iterative self-generation (docs/design.md#iterative-training): render, score, keep the best, fine-tune.

Round k renders ``images_per_round`` images with model k (round 0: the Seg-Mix LoRA), scores them, keeps the best
and, unless the loop stops, trains model k+1 on the kept images with a KL term towards model k. Everything of a
round lives in ``<root>/<run>/round_<k>/``; a round whose ``summary.json`` exists is not rendered again, and
training resumes from its checkpoints, so an interrupted loop continues where it stopped. The run folder is named
by a hash of everything that changes the results except ``max_rounds``, so raising ``max_rounds`` continues the
same loop. ``current.json`` in the root names the best round's LoRA (highest median D&C).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from safetensors.torch import load_file

from pipeline.dnc.pair_scorer import ImageScorer
from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.infer import Layout
from pipeline.iteration_rules import (
    IterationConfig,
    RoundSummary,
    best_round,
    mean_pairwise_distance,
    preference_pairs,
    prompt_distances,
    select_kept,
    stop_reason,
    summarize_round,
)
from pipeline.lora.record import CURRENT_FILE, IterationPick, LoraRecord, read_current, write_current
from pipeline.lora.versions import TrainingRun, train_preference_version, train_version
from pipeline.models.loading import release_memory
from pipeline.rendering import GenerationSettings, render_samples
from pipeline.settings import identity_record
from pipeline.stage_names import Stage
from pipeline.storage.atomic import write_json_atomic
from pipeline.storage.hashing import sha256_file, sha256_json
from pipeline.storage.manifest import read_manifest, write_manifest
from pipeline.train import TrainConfig, TrainingSample
from pipeline.train.data import INSTANCE
from pipeline.train.preference import check_preference_config
from pipeline.train.runtime import check_mixed_precision

_STOP_ONLY_FIELDS = frozenset({"max_rounds", "convergence", "d_conv"})
SUMMARY_FILE = "summary.json"
ROUNDS_FILE = "rounds.parquet"
PROMPT_DISTANCES_FILE = "prompt_distances.json"
"""Per prompt of a round: the mean pairwise Euclidean distance of all its images' embeddings."""
STOP_PAUSED = "paused"
"""Not a convergence reason: the run's ``rounds_per_run`` budget was spent; the next run continues."""


@dataclass
class IterationOutput:
    run_dir: Path
    history: list[RoundSummary]
    best_round: int
    best_lora: LoraRecord
    stop_reason: str | None
    rounds: pd.DataFrame
    kept: pd.DataFrame
    """The last round's kept images with their D&C rows (for previews)."""


def _run_version(
    base_lora: LoraRecord, config: IterationConfig, generation: GenerationSettings, train: TrainConfig
) -> str:
    # The round budget and the convergence rule only decide where the loop stops (every round's numbers are
    # computed whichever rule is chosen), so changing them continues the same loop.
    fields = {k: v for k, v in config.as_record().items() if k not in _STOP_ONLY_FIELDS}
    identity = [base_lora.diffusers_sha256, fields, identity_record(generation), train.result_fields()]
    return "iter-" + sha256_json(identity)[:12]


def round_grid(prompts: Sequence[str], images: int) -> tuple[list[str], list[int]]:
    """(prompts used, images of each): exactly ``images`` in all, spread as evenly as possible, the first prompts
    taking one more when it does not divide (200 over 3 prompts: 67, 67, 66); fewer prompts when there are more
    prompts than images (4 over 8: the first 4 prompts once)."""
    if images < 1 or not prompts:
        raise CastloraError(f"A round needs at least one prompt and one image; got {len(prompts)} and {images}.")
    used = list(prompts[:images])
    base, extra = divmod(images, len(used))
    return used, [base + (1 if i < extra else 0) for i in range(len(used))]


def round_seeds(generation: GenerationSettings, round_index: int, per_prompt: int) -> list[int]:
    """Fresh seeds each round (a round must not re-render the previous round's images)."""
    start = generation.seed + 100_003 * (round_index + 1)
    return list(range(start, start + per_prompt))


def _lora_state(path: str | Path, pipe: Any) -> dict[str, Any]:
    """An exported diffusers LoRA file as ``init_lora``: its denoiser part (the family's ``denoiser`` prefix:
    ``unet.`` keys for SDXL, ``transformer.`` for FLUX.1) and, for a text-encoder LoRA, its text encoders' parts,
    so round k+1 starts from all of model k."""
    state = load_file(str(path))
    denoiser = family_for(pipe).denoiser
    if not any(k.startswith(f"{denoiser}.") for k in state):
        raise CastloraError(
            f"{path} holds no {denoiser} LoRA tensors (keys starting with '{denoiser}.'); re-export the LoRA."
        )
    return state


@dataclass(frozen=True)
class RoundTraining:
    """The training settings of every round, fixed (and checked) before round 0 renders."""

    fine_tune: TrainConfig
    """Model k → model k+1 on round k's kept images, KL towards model k."""
    preference: TrainConfig | None
    """The optional Diffusion-DPO step after the fine-tune; None when ``IterationConfig.preference`` is off."""


def round_training(base: TrainConfig, config: IterationConfig) -> RoundTraining:
    """What each round trains with: the base LoRA's settings with the iteration's own fields set explicitly.

    Set by the iteration (whatever the base LoRA used):

    - ``steps``: ``train_steps`` (fine-tune) or ``dpo_steps`` (preference step);
    - ``segmix_p=0`` and ``prior_weight=0``: the generated images already show every character together, and
      model k (through the KL term, or DPO's reference) anchors the model instead of class images;
    - ``dco_beta=0``: DCO regularises towards the base model without any LoRA, which would pull each round back
      towards the un-personalised model; the KL term towards model k is the round's regulariser;
    - ``kl_weight``: the iteration's ``kl_weight`` (fine-tune) or 0 (preference step: DPO's β is its own
      regulariser); ``dpo_beta``: 0 (fine-tune) or the iteration's ``dpo_beta`` (preference step).

    Inherited unchanged (every other field): the LoRA's shape (rank, alpha, targets, train_text_encoder,
    text_encoder_lr), since round k+1 starts from model k's weights; the optimiser and schedule; the loss and
    mask settings; resolution and mixed precision; memory settings (gradient checkpointing, compile); the seed,
    checkpointing and logging.

    Raises ``CastloraError`` for a combination no round could train (e.g. the preference step with a
    text-encoder LoRA), so a loop never fails after hours of rendering and fine-tuning.
    """
    shared = {"segmix_p": 0.0, "prior_weight": 0.0, "dco_beta": 0.0}
    try:
        fine_tune = dataclasses.replace(
            base, **shared, steps=config.train_steps, kl_weight=config.kl_weight, dpo_beta=0.0
        )
        preference = (
            dataclasses.replace(base, **shared, steps=config.dpo_steps, kl_weight=0.0, dpo_beta=config.dpo_beta)
            if config.preference
            else None
        )
    except CastloraError as exc:
        raise CastloraError(f"The iteration's training settings are invalid: {exc}") from exc
    check_mixed_precision(fine_tune)
    if preference is not None:
        if preference.train_text_encoder:
            raise CastloraError(
                "The iteration has preference=True, but the base LoRA trains text encoders too "
                "(train_text_encoder=True) and the Diffusion-DPO step tunes only the U-Net LoRA: set preference "
                "to false in the iteration config, or iterate on a LoRA trained with train_text_encoder=False."
            )
        check_preference_config(preference)
    return RoundTraining(fine_tune, preference)


def _ranking(records: pd.DataFrame, manifest: pd.DataFrame, config: IterationConfig) -> pd.DataFrame:
    """One row per image: the D&C of the configured embedder and mode, with the image's prompt and seed."""
    chosen = records[(records["embedder"] == config.dnc_embedder) & (records["mode"] == config.dnc_mode)]
    if chosen.empty:
        raise CastloraError(
            f"No D&C scores for embedder {config.dnc_embedder!r} in mode {config.dnc_mode!r}: that embedder is "
            "unavailable. Configure its model or choose an available dnc_embedder."
        )
    info = manifest.reset_index(drop=True)[["path", "sha256", "prompt", "seed"]].rename(columns={"path": "image_path"})
    info["image_index"] = range(len(info))
    return chosen.merge(info, on="image_index", how="left")


@dataclass(frozen=True)
class SavedRound:
    """A scored round as its ``summary.json`` keeps it: the summary and, once trained, the next model."""

    summary: dict[str, Any]
    trained_lora: LoraRecord | None


@dataclass
class _Loop:
    """The rounds of one ``run_iteration`` call; split out so each step reads on its own."""

    run_dir: Path
    base_lora: LoraRecord
    config: IterationConfig
    pipe_factory: Callable[[], Any]
    scorer: ImageScorer
    layout_factory: Callable[[int], Layout]
    generation: GenerationSettings
    training: RoundTraining
    run: TrainingRun
    """Cache, lineage recorder, base model and log callback of the whole loop; ``lora_root`` is per round."""
    log: Callable[[str], None]

    def round_dir(self, k: int) -> Path:
        return self.run_dir / f"round_{k:02d}"

    def saved(self, k: int) -> SavedRound | None:
        path = self.round_dir(k) / SUMMARY_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        trained = record.get("trained_lora")
        if trained is not None:
            trained = LoraRecord.from_json(trained, path.parent, f"{path} (trained_lora)")
        return SavedRound(record["summary"], trained)

    def save(self, k: int, summary: RoundSummary, trained_lora: LoraRecord | None) -> None:
        folder = self.round_dir(k)
        trained = trained_lora.to_json(folder) if trained_lora is not None else None
        write_json_atomic({"summary": dataclasses.asdict(summary), "trained_lora": trained}, folder / SUMMARY_FILE)

    def model_of(self, k: int) -> LoraRecord:
        """Model k: the Seg-Mix LoRA for round 0, else the LoRA trained on round k-1's kept images."""
        if k == 0:
            return self.base_lora
        saved = self.saved(k - 1)
        if saved is None or saved.trained_lora is None:
            raise CastloraError(f"Round {k - 1} in {self.run_dir} has no trained LoRA, so round {k} cannot run.")
        return saved.trained_lora

    def training_run(self, folder: Path) -> TrainingRun:
        return dataclasses.replace(self.run, lora_root=folder)

    def generate_and_score(self, k: int) -> pd.DataFrame:
        """Render round k with model k and rank its images by D&C (also written as ``ranking.parquet``)."""
        gen = self.generation
        folder = self.round_dir(k)
        model = self.model_of(k)
        prompts, counts = round_grid(gen.prompts, self.config.images_per_round)
        pipe = self.pipe_factory()
        pipe.load_lora_weights(str(model.diffusers))
        manifest = render_samples(
            pipe=pipe,
            prompts=prompts,
            seeds=round_seeds(gen, k, max(counts)),
            images_per_prompt=counts,
            layout_factory=self.layout_factory,
            gamma=self.config.gamma,
            settings=gen.render_settings(),
            lora_version=model.version,
            lora_sha256=model.diffusers_sha256,
            out_dir=folder / "samples",
            recorder=self.run.recorder,
            model_ids=[self.run.base_model_id],
        )
        del pipe
        release_memory()
        images = [Image.open(p).convert("RGB") for p in manifest["path"]]
        boxes = [json.loads(b) for b in manifest["layout_boxes_json"]]  # the layouts the images were rendered from
        records = self.scorer.score(images, boxes)
        write_manifest(records, folder, "dnc.parquet")
        ranking = _ranking(records, manifest, self.config)
        write_manifest(ranking, folder, "ranking.parquet")
        return ranking

    def keep(self, k: int, ranking: pd.DataFrame, round0_distance: float | None) -> RoundSummary:
        """Select the kept images and measure the round: the kept set's distance (``kept_ratio`` rule) and
        every prompt's distance over all its images (``per_prompt`` rule), both always, so either rule can
        judge a saved round."""
        kept = select_kept(ranking, self.config.keep_top, self.config.min_dnc)
        paths = [str(p) for p in ranking["image_path"]]
        images = [Image.open(p).convert("RGB") for p in paths]
        embeddings = self.scorer.embed(images, self.config.dnc_embedder)
        row_of = {path: i for i, path in enumerate(paths)}
        kept_rows = [row_of[str(p)] for p in kept["image_path"]]
        distance = mean_pairwise_distance(embeddings[kept_rows]) if kept_rows else np.nan
        per_prompt = prompt_distances([str(p) for p in ranking["prompt"]], embeddings)
        readable = {p: (d if np.isfinite(d) else None) for p, d in per_prompt.items()}  # None: fewer than 2 images
        write_json_atomic(readable, self.round_dir(k) / PROMPT_DISTANCES_FILE)
        kept_path = write_manifest(kept, self.round_dir(k), "kept.parquet")
        self.run.recorder.record(
            kept_path,
            sha256_file(kept_path),
            [str(sha) for sha in kept["sha256"]],
            {"round": k, "kept": len(kept), "kept_distance": float(distance), **self.config.as_record()},
        )
        return summarize_round(k, ranking, kept, distance, round0_distance, per_prompt)

    def train_next(self, k: int) -> LoraRecord:
        """Model k+1: fine-tune model k on round k's kept images with KL towards model k (then DPO if enabled)."""
        kept = read_manifest(self.round_dir(k), Stage.ITERATION, "kept.parquet")
        samples = [_generated_sample(row) for row in kept.to_dict("records")]
        pipe = self.pipe_factory()
        out = train_version(
            pipe=pipe,
            samples=samples,
            config=self.training.fine_tune,
            run=self.training_run(self.round_dir(k) / "lora"),
            init_lora=_lora_state(self.model_of(k).diffusers, pipe),
        )
        del pipe
        release_memory()
        trained = out.as_current()
        if self.training.preference is not None:
            trained = self.preference_step(k, trained, self.training.preference)
        return trained

    def preference_step(self, k: int, trained: LoraRecord, config: TrainConfig) -> LoraRecord:
        ranking = read_manifest(self.round_dir(k), Stage.ITERATION, "ranking.parquet")
        pairs = preference_pairs(ranking, self.config.preference_margin)
        if not pairs:
            self.log(f"round {k}: no (winner, loser) pair with a D&C gap >= {self.config.preference_margin}; no DPO")
            return trained
        by_path = {str(r["image_path"]): _generated_sample(r) for r in ranking.to_dict("records")}
        pipe = self.pipe_factory()
        out = train_preference_version(
            pipe=pipe,
            pairs=[(by_path[winner], by_path[loser]) for winner, loser in pairs],
            config=config,
            run=self.training_run(self.round_dir(k) / "dpo"),
            init_lora=_lora_state(trained.diffusers, pipe),
        )
        del pipe
        release_memory()
        return out.as_current()


def _generated_sample(row: dict[str, Any]) -> TrainingSample:
    """A rendered image of a round (a ranking row) as a training sample, captioned with its own prompt."""
    return TrainingSample(str(row["sha256"]), str(row["image_path"]), str(row["prompt"]), INSTANCE)


def run_iteration(
    *,
    pipe_factory: Callable[[], Any],
    base_lora: LoraRecord,
    scorer: ImageScorer,
    layout_factory: Callable[[int], Layout],
    generation: GenerationSettings,
    config: IterationConfig,
    train_config: TrainConfig,
    run: TrainingRun,
    rounds_per_run: int | None = None,
    log: Callable[[str], None] = print,
) -> IterationOutput:
    """Run (or continue) the loop from ``base_lora`` (the pair's LoRA record) until it stops.

    ``run.lora_root`` is the iteration's folder: each run is a subfolder, each round's LoRAs are trained inside
    it, and its ``current.json`` names the picked model.

    ``rounds_per_run`` (None: no limit) renders at most that many new rounds in this call (one round per
    materialization with 1); the loop then stops with ``"paused"`` and the next call continues it.
    """
    if not generation.prompts:
        raise CastloraError("Iteration needs prompts: configure some or use the default scene prompts.")
    training = round_training(train_config, config)  # before round 0: a bad combination fails before any work
    root = Path(run.lora_root)
    run_dir = root / _run_version(base_lora, config, generation, train_config)
    loop = _Loop(run_dir, base_lora, config, pipe_factory, scorer, layout_factory, generation, training, run, log)
    history: list[RoundSummary] = []
    reason: str | None = None
    new_rounds = 0
    for k in range(config.max_rounds):
        saved = loop.saved(k)
        if saved is not None:
            summary = RoundSummary(**{**saved.summary, "stop_reason": None})
            log(f"round {k}: already scored ({summary.n_kept}/{summary.n_generated} kept); reusing it")
        elif rounds_per_run is not None and new_rounds >= rounds_per_run:
            reason = STOP_PAUSED
            break
        else:
            log(f"round {k}: rendering {config.images_per_round} images with model {loop.model_of(k).version}")
            ranking = loop.generate_and_score(k)
            summary = loop.keep(k, ranking, history[0].kept_distance if history else None)
            new_rounds += 1
        # Recomputed, not read back: a larger max_rounds must let a finished loop continue.
        reason = stop_reason([*history, summary], config)
        summary = dataclasses.replace(summary, stop_reason=reason)
        history.append(summary)
        trained = saved.trained_lora if saved else None
        loop.save(k, summary, trained)  # scored: a crash while training does not re-render the round
        if reason is not None:
            break
        if trained is None:
            log(f"round {k}: training model {k + 1} on {summary.n_kept} kept images (KL weight {config.kl_weight})")
            loop.save(k, summary, loop.train_next(k))
    rounds = pd.DataFrame([{**dataclasses.asdict(r), "converged": r.converged} for r in history])
    rounds_path = write_manifest(rounds, run_dir, ROUNDS_FILE)
    best = best_round(history)
    best_lora = loop.model_of(best)
    pick = IterationPick(best, run_dir.name, reason, config.convergence, base_lora.version)
    write_current(dataclasses.replace(best_lora, picked=pick), root)
    run.recorder.record(
        rounds_path,
        sha256_file(rounds_path),
        [base_lora.diffusers_sha256],
        {"best_round": best, "stop_reason": reason, **config.as_record()},  # as_record holds `convergence`
    )
    last_kept = read_manifest(loop.round_dir(history[-1].round), Stage.ITERATION, "kept.parquet")
    return IterationOutput(run_dir, history, best, best_lora, reason, rounds, last_kept)


def current_iteration(root: Path) -> LoraRecord:
    """The best round's LoRA of the last iteration run (``picked`` says which round of which run)."""
    record = read_current(root, Stage.ITERATION)
    if record.picked is None:
        raise CastloraError(
            f"{Path(root) / CURRENT_FILE} does not say which round it is (field 'round'): re-materialize 'iteration'."
        )
    return record
