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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image
from safetensors.torch import load_file

from pipeline.atomic import write_json_atomic
from pipeline.errors import CastloraError
from pipeline.hashing import sha256_file, sha256_json
from pipeline.infer import Layout
from pipeline.iteration import (
    IterationConfig,
    RoundSummary,
    best_round,
    mean_pairwise_distance,
    preference_pairs,
    select_kept,
    stop_reason,
    summarize_round,
)
from pipeline.lineage import LineageRecorder
from pipeline.manifest import read_manifest, write_manifest
from pipeline.models.loading import release_memory
from pipeline.stages.lora import loaded_lora, run_lora, run_preference, stored_lora
from pipeline.stages.samples import run_samples
from pipeline.train import TrainConfig, TrainingSample
from pipeline.train.data import INSTANCE

SUMMARY_FILE = "summary.json"
ROUNDS_FILE = "rounds.parquet"
CURRENT_FILE = "current.json"
STOP_PAUSED = "paused"
"""Not a convergence reason: the run's ``rounds_per_run`` budget was spent; the next run continues."""


class ImageScorer(Protocol):
    """D&C for generated images (``pipeline.dnc.scorer.DncScorer``)."""

    def score(self, images: Sequence[Image.Image], layout_boxes: Sequence[Sequence[Sequence[float]]]) -> pd.DataFrame:
        """One row per (image, embedder, mode): image_index, embedder, mode, score, reason, boxes_json, ..."""
        ...

    def embed(self, images: Sequence[Image.Image], embedder: str) -> np.ndarray: ...


@dataclass(frozen=True)
class GenerationSettings:
    prompts: tuple[str, ...]
    resolution: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None
    seed: int = 0


@dataclass
class IterationOutput:
    run_dir: Path
    history: list[RoundSummary]
    best_round: int
    best_lora: dict[str, Any]
    stop_reason: str | None
    rounds: pd.DataFrame
    kept: pd.DataFrame
    """The last round's kept images with their D&C rows (for previews)."""


def _run_version(
    base_lora: dict[str, Any], config: IterationConfig, generation: GenerationSettings, train: TrainConfig
) -> str:
    fields = {k: v for k, v in config.as_record().items() if k != "max_rounds"}
    identity = [base_lora["sha256"]["diffusers"], fields, dataclasses.asdict(generation), train.result_fields()]
    return "iter-" + sha256_json(identity)[:12]


def round_grid(prompts: Sequence[str], images: int) -> tuple[list[str], int]:
    """(prompts used, images per prompt): ``images`` spread evenly, using fewer prompts when there are more
    prompts than images (200 over 8 prompts: 25 each; 4 over 8: the first 4 prompts once)."""
    per_prompt = math.ceil(images / len(prompts))
    return list(prompts[: math.ceil(images / per_prompt)]), per_prompt


def round_seeds(generation: GenerationSettings, round_index: int, per_prompt: int) -> list[int]:
    """Fresh seeds each round (a round must not re-render the previous round's images)."""
    start = generation.seed + 100_003 * (round_index + 1)
    return list(range(start, start + per_prompt))


def _lora_state(path: str | Path) -> dict[str, Any]:
    """The U-Net part of an exported diffusers LoRA file, keyed as ``unet_lora_state_dict`` returns it."""
    state = load_file(str(path))
    unet = {k: v for k, v in state.items() if k.startswith("unet.")}
    if not unet:
        raise CastloraError(f"{path} holds no U-Net LoRA tensors (keys starting with 'unet.'); re-export the LoRA.")
    return unet


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


@dataclass
class _Loop:
    """The rounds of one ``run_iteration`` call; split out so each step reads on its own."""

    run_dir: Path
    base_lora: dict[str, Any]
    config: IterationConfig
    pipe_factory: Callable[[], Any]
    scorer: ImageScorer
    layout_factory: Callable[[int], Layout]
    generation: GenerationSettings
    train_config: TrainConfig
    cache_dir: Path
    recorder: LineageRecorder
    base_model_id: str
    on_log: Callable[[int, dict], None] | None
    log: Callable[[str], None]

    def round_dir(self, k: int) -> Path:
        return self.run_dir / f"round_{k:02d}"

    def saved(self, k: int) -> dict[str, Any] | None:
        path = self.round_dir(k) / SUMMARY_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if isinstance(record.get("trained_lora"), dict):
            record["trained_lora"] = loaded_lora(record["trained_lora"], path.parent)
        return record

    def save(self, k: int, summary: RoundSummary, trained_lora: dict[str, Any] | None) -> None:
        folder = self.round_dir(k)
        trained = stored_lora(trained_lora, folder) if trained_lora is not None else None
        write_json_atomic({"summary": dataclasses.asdict(summary), "trained_lora": trained}, folder / SUMMARY_FILE)

    def model_of(self, k: int) -> dict[str, Any]:
        """Model k: the Seg-Mix LoRA for round 0, else the LoRA trained on round k-1's kept images."""
        if k == 0:
            return self.base_lora
        saved = self.saved(k - 1)
        if not saved or not isinstance(saved.get("trained_lora"), dict):
            raise CastloraError(f"Round {k - 1} in {self.run_dir} has no trained LoRA, so round {k} cannot run.")
        return saved["trained_lora"]

    def generate_and_score(self, k: int) -> pd.DataFrame:
        """Render round k with model k and rank its images by D&C (also written as ``ranking.parquet``)."""
        gen = self.generation
        folder = self.round_dir(k)
        model = self.model_of(k)
        prompts, per_prompt = round_grid(gen.prompts, self.config.images_per_round)
        pipe = self.pipe_factory()
        pipe.load_lora_weights(model["diffusers"])
        manifest = run_samples(
            pipe,
            prompts,
            round_seeds(gen, k, per_prompt),
            per_prompt,
            self.layout_factory,
            self.config.gamma,
            model["version"],
            folder / "samples",
            self.recorder,
            gen.resolution,
            gen.resolution,
            gen.steps,
            gen.guidance_scale,
            gen.negative_prompt,
            lora_sha256=model["sha256"]["diffusers"],
            model_ids=[self.base_model_id],
        )
        del pipe
        release_memory()
        images = [Image.open(p).convert("RGB") for p in manifest["path"]]
        boxes = [json.loads(b) for b in manifest["layout_boxes_json"]]  # the layouts run_samples rendered from
        records = self.scorer.score(images, boxes)
        write_manifest(records, folder, "dnc.parquet")
        ranking = _ranking(records, manifest, self.config)
        write_manifest(ranking, folder, "ranking.parquet")
        return ranking

    def keep(self, k: int, ranking: pd.DataFrame, round0_distance: float | None) -> RoundSummary:
        kept = select_kept(ranking, self.config.keep_top, self.config.min_dnc)
        images = [Image.open(p).convert("RGB") for p in kept["image_path"]]
        distance = mean_pairwise_distance(self.scorer.embed(images, self.config.dnc_embedder)) if images else np.nan
        kept_path = write_manifest(kept, self.round_dir(k), "kept.parquet")
        self.recorder.record(
            kept_path,
            sha256_file(kept_path),
            [str(sha) for sha in kept["sha256"]],
            {"round": k, "kept": len(kept), "kept_distance": float(distance), **self.config.as_record()},
        )
        return summarize_round(k, ranking, kept, distance, round0_distance)

    def fine_tune_config(self, **fields: Any) -> TrainConfig:
        """The base LoRA's settings for training on generated images: they already show every character
        together, so no Seg-Mix composites and no prior preservation."""
        return dataclasses.replace(self.train_config, segmix_p=0.0, prior_weight=0.0, **fields)

    def train_next(self, k: int) -> dict[str, Any]:
        """Model k+1: fine-tune model k on round k's kept images with KL towards model k (then DPO if enabled)."""
        kept = read_manifest(self.round_dir(k), "iteration", "kept.parquet")
        samples = [_generated_sample(row) for row in kept.to_dict("records")]
        config = self.fine_tune_config(steps=self.config.train_steps, kl_weight=self.config.kl_weight)
        pipe = self.pipe_factory()
        out = run_lora(
            pipe,
            samples,
            config,
            self.round_dir(k) / "lora",
            self.cache_dir,
            self.recorder,
            self.base_model_id,
            on_log=self.on_log,
            init_lora=_lora_state(self.model_of(k)["diffusers"]),
        )
        del pipe
        release_memory()
        trained = out.as_current()
        if self.config.preference:
            trained = self.preference_step(k, trained)
        return trained

    def preference_step(self, k: int, trained: dict[str, Any]) -> dict[str, Any]:
        ranking = read_manifest(self.round_dir(k), "iteration", "ranking.parquet")
        pairs = preference_pairs(ranking, self.config.preference_margin)
        if not pairs:
            self.log(f"round {k}: no (winner, loser) pair with a D&C gap >= {self.config.preference_margin}; no DPO")
            return trained
        by_path = {str(r["image_path"]): _generated_sample(r) for r in ranking.to_dict("records")}
        config = self.fine_tune_config(steps=self.config.dpo_steps, dpo_beta=self.config.dpo_beta)
        pipe = self.pipe_factory()
        out = run_preference(
            pipe,
            [(by_path[winner], by_path[loser]) for winner, loser in pairs],
            config,
            self.round_dir(k) / "dpo",
            self.cache_dir,
            self.recorder,
            self.base_model_id,
            init_lora=_lora_state(trained["diffusers"]),
            on_log=self.on_log,
        )
        del pipe
        release_memory()
        return out.as_current()


def _generated_sample(row: dict[str, Any]) -> TrainingSample:
    """A rendered image of a round (a ranking row) as a training sample, captioned with its own prompt."""
    return TrainingSample(str(row["sha256"]), str(row["image_path"]), str(row["prompt"]), INSTANCE)


def run_iteration(
    pipe_factory: Callable[[], Any],
    base_lora: dict[str, Any],
    scorer: ImageScorer,
    layout_factory: Callable[[int], Layout],
    generation: GenerationSettings,
    config: IterationConfig,
    train_config: TrainConfig,
    root: Path,
    cache_dir: Path,
    recorder: LineageRecorder,
    base_model_id: str,
    rounds_per_run: int = 0,
    on_log: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> IterationOutput:
    """Run (or continue) the loop from ``base_lora`` (a ``current_lora`` dict) until it stops.

    ``rounds_per_run`` > 0 renders at most that many new rounds in this call (one round per materialization
    with 1); the loop then stops with ``"paused"`` and the next call continues it.
    """
    if not generation.prompts:
        raise CastloraError("Iteration needs prompts: configure some or use the default scene prompts.")
    root = Path(root)
    run_dir = root / _run_version(base_lora, config, generation, train_config)
    loop = _Loop(
        run_dir, base_lora, config, pipe_factory, scorer, layout_factory, generation, train_config,
        Path(cache_dir), recorder, base_model_id, on_log, log,
    )  # fmt: skip
    history: list[RoundSummary] = []
    reason: str | None = None
    new_rounds = 0
    for k in range(config.max_rounds):
        saved = loop.saved(k)
        if saved is not None:
            summary = RoundSummary(**{**saved["summary"], "stop_reason": None})
            log(f"round {k}: already scored ({summary.n_kept}/{summary.n_generated} kept); reusing it")
        elif rounds_per_run and new_rounds >= rounds_per_run:
            reason = STOP_PAUSED
            break
        else:
            log(f"round {k}: rendering {config.images_per_round} images with model {loop.model_of(k)['version']}")
            ranking = loop.generate_and_score(k)
            summary = loop.keep(k, ranking, history[0].kept_distance if history else None)
            new_rounds += 1
        # Recomputed, not read back: a larger max_rounds must let a finished loop continue.
        reason = stop_reason([*history, summary], config)
        summary = dataclasses.replace(summary, stop_reason=reason)
        history.append(summary)
        trained = saved.get("trained_lora") if saved else None
        loop.save(k, summary, trained)  # scored: a crash while training does not re-render the round
        if reason is not None:
            break
        if not isinstance(trained, dict):
            log(f"round {k}: training model {k + 1} on {summary.n_kept} kept images (KL weight {config.kl_weight})")
            loop.save(k, summary, loop.train_next(k))
    rounds = pd.DataFrame([{**dataclasses.asdict(r), "converged": r.converged} for r in history])
    rounds_path = write_manifest(rounds, run_dir, ROUNDS_FILE)
    best = best_round(history)
    best_lora = loop.model_of(best)
    current = {
        **best_lora,
        "round": best,
        "run": run_dir.name,
        "stop_reason": reason,
        "base_lora": base_lora["version"],
    }
    write_json_atomic(stored_lora(current, root), root / CURRENT_FILE)
    recorder.record(
        rounds_path,
        sha256_file(rounds_path),
        [base_lora["sha256"]["diffusers"]],
        {"best_round": best, "stop_reason": reason, **config.as_record()},
    )
    last_kept = read_manifest(loop.round_dir(history[-1].round), "iteration", "kept.parquet")
    return IterationOutput(run_dir, history, best, best_lora, reason, rounds, last_kept)


def current_iteration(root: Path) -> dict[str, Any]:
    path = Path(root) / CURRENT_FILE
    if not path.is_file():
        raise CastloraError(f"{path} does not exist: materialize the 'iteration' asset for this pair first.")
    return loaded_lora(json.loads(path.read_text()), path.parent)
