"""Iterative self-generation (MuDI §5.5, The Chosen One; docs/design.md#iterative-training): what to keep, when to stop.

A round renders many images with the current LoRA, scores each with Detect-and-Compare, keeps the best ones
that show every character (count gate) and clear a threshold, and fine-tunes the next LoRA on them with a KL
term towards the current model. The loop stops when the identities have converged, when the median D&C of a
round stops improving on the best before it, or after ``max_rounds``. Two convergence rules, chosen by
``IterationConfig.convergence``:

- ``kept_ratio`` (the default): the kept top-``keep_top`` images, pooled over all prompts, have a mean pairwise
  cosine distance below ``distance_fraction`` × round 0's (a relative threshold, from round 1 on); stop reason
  ``distance``.
- ``per_prompt`` (The Chosen One's criterion): for every prompt, the mean pairwise Euclidean distance of the
  embeddings of all images rendered for it (not only the kept ones) is below the absolute ``d_conv`` (from
  round 0 on: it needs no reference round); stop reason ``prompt_distance``.

These rules are pure functions of the rounds' summaries, so they are tested without any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.dnc.metric import MODES, l2_normalize
from pipeline.errors import CastloraError
from pipeline.settings import from_preset, unresolved

STOP_DISTANCE = "distance"
"""Stop reason of the ``kept_ratio`` convergence rule."""
STOP_PROMPT_DISTANCE = "prompt_distance"
"""Stop reason of the ``per_prompt`` convergence rule (The Chosen One)."""
STOP_NO_IMPROVEMENT = "no_improvement"
STOP_MAX_ROUNDS = "max_rounds"
STOP_NOTHING_KEPT = "nothing_kept"
CONVERGENCE_KEPT_RATIO = "kept_ratio"
CONVERGENCE_PER_PROMPT = "per_prompt"
CONVERGENCE_RULES = (CONVERGENCE_KEPT_RATIO, CONVERGENCE_PER_PROMPT)


@dataclass(frozen=True)
class IterationConfig:
    images_per_round: int | None = from_preset("iteration_images")
    """Images rendered per round (MuDI: 200), spread over the prompts. Not set: the model preset's
    ``iteration_images``."""
    keep_top: int | None = from_preset("iteration_keep")
    """Images kept per round for the next fine-tune (MuDI: top 50 by D&C). Not set: the model preset's
    ``iteration_keep``."""
    min_dnc: float | None = None
    """Kept images must also score at least this; not set: only the count gate."""
    train_steps: int | None = from_preset("iteration_steps")
    """Fine-tuning steps per round (MuDI: ~1000). Not set: the model preset's ``iteration_steps``."""
    kl_weight: float = 1.0
    """Weight of the KL term towards the previous round's model (MuDI ≈ 1.0; prevents over-saturation)."""
    max_rounds: int | None = from_preset("iteration_rounds")
    """Rounds of generate → score → keep; every round but the last also trains the next LoRA. Not set: the model
    preset's ``iteration_rounds`` (tiny: one fine-tune, then its check)."""
    distance_fraction: float = 0.8
    """``kept_ratio`` rule: converged when the kept set's mean pairwise distance < this × round 0's (0.6-0.8 in
    The Chosen One's unofficial code)."""
    convergence: str = CONVERGENCE_KEPT_RATIO
    """Which rule says the identities converged: ``kept_ratio`` (kept set relative to round 0) or ``per_prompt``
    (The Chosen One: every prompt's images closer than ``d_conv``); see the module docstring."""
    d_conv: float | None = None
    """``per_prompt`` rule's absolute threshold on the mean pairwise Euclidean distance of one prompt's image
    embeddings (castlora's embeddings are unit vectors, so distances lie in [0, 2]); required by that rule."""
    min_improvement: float = 0.0
    """A round whose median D&C is not above the best earlier round's by more than this stops the loop."""
    gamma: float = 1.0
    """MuDI init weight for the generated images."""
    dnc_mode: str = "default"
    """Detect-and-Compare mode that ranks the images: ``default`` or ``mudi`` (docs/design.md#scoring-and-modes)."""
    dnc_embedder: str = "dinov2"
    """Embedder whose D&C ranks the images; the kept set's distance uses the same embedder."""
    preference: bool = False
    """IdGlow-style step: Diffusion-DPO on (best, worst) D&C pairs of the same prompt after the KL fine-tune."""
    dpo_beta: float = 5000.0
    """Diffusion-DPO's β for the preference step (see ``TrainConfig.dpo_beta``)."""
    dpo_steps: int = 200
    """Optimizer steps of the preference step."""
    preference_margin: float = 0.05
    """A (winner, loser) pair needs at least this D&C gap, so near-ties do not teach noise."""

    def __post_init__(self) -> None:
        problems = [
            f"{name}={value} must be >= 1 (leave it unset for the model preset's default)"
            for name in ("images_per_round", "keep_top", "train_steps", "max_rounds")
            if (value := getattr(self, name)) is not None and value < 1
        ]
        if self.keep_top is not None and self.images_per_round is not None and self.keep_top > self.images_per_round:
            problems.append(f"keep_top={self.keep_top} cannot exceed images_per_round={self.images_per_round}")
        if not 0.0 < self.distance_fraction <= 1.0:
            problems.append(f"distance_fraction={self.distance_fraction} must be in (0, 1]")
        if self.dpo_steps < 1:
            problems.append(f"dpo_steps={self.dpo_steps} must be >= 1")
        if self.kl_weight < 0 or self.dpo_beta <= 0 or self.preference_margin < 0:
            problems.append("kl_weight and preference_margin must be >= 0, dpo_beta > 0")
        if self.convergence not in CONVERGENCE_RULES:
            problems.append(f"convergence={self.convergence!r} must be one of {list(CONVERGENCE_RULES)}")
        elif self.convergence == CONVERGENCE_PER_PROMPT and (self.d_conv is None or self.d_conv <= 0):
            problems.append(f"convergence='per_prompt' needs d_conv > 0 (got {self.d_conv})")
        elif self.convergence == CONVERGENCE_KEPT_RATIO and self.d_conv is not None:
            problems.append(f"d_conv={self.d_conv} is used only by convergence='per_prompt'; remove it or switch")
        if self.dnc_mode not in MODES:
            problems.append(f"dnc_mode={self.dnc_mode!r} must be one of {sorted(MODES)}")
        if problems:
            raise CastloraError("Invalid iteration config: " + "; ".join(problems) + ".")

    def as_record(self) -> dict[str, Any]:
        """Every field, JSON-ready (what the loop's version hashes): refused while a preset field is unset."""
        if unresolved(self):
            raise CastloraError(
                f"IterationConfig {unresolved(self)} not set: resolve them against a model preset first."
            )
        return asdict(self)


@dataclass(frozen=True)
class RoundSummary:
    round: int
    n_generated: int
    n_kept: int
    dnc_median: float
    """Median D&C over every image of the round (count-gate failures count as 0, as D&C defines them)."""
    dnc_median_kept: float
    kept_distance: float
    """Mean pairwise cosine distance between the kept images' embeddings (NaN with fewer than two)."""
    distance_ratio: float
    """kept_distance / round 0's kept_distance."""
    count_fail_rate: float
    stop_reason: str | None = None
    prompt_distance: float = float("nan")
    """The largest, over the round's prompts, mean pairwise Euclidean distance of all the images of one prompt
    (the ``per_prompt`` rule's number; NaN when no prompt has two images, or in rounds scored before it existed)."""

    @property
    def converged(self) -> bool:
        return self.stop_reason in (STOP_DISTANCE, STOP_PROMPT_DISTANCE)


def select_kept(scores: pd.DataFrame, keep_top: int, min_dnc: float | None) -> pd.DataFrame:
    """The best ``keep_top`` images that pass the count gate (``reason`` is null) and ``min_dnc``.

    ``scores`` has one row per image with ``image_path``, ``score`` and ``reason``. Ties break on the path, so
    the choice does not depend on row order.
    """
    missing = {"image_path", "score", "reason"} - set(scores.columns)
    if missing:
        raise CastloraError(f"select_kept: the scores table lacks columns {sorted(missing)}.")
    passing = scores[scores["reason"].isna()]
    if min_dnc is not None:
        passing = passing[passing["score"] >= min_dnc]
    ranked = passing.sort_values(["score", "image_path"], ascending=[False, True], kind="stable")
    return ranked.head(keep_top).reset_index(drop=True)


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean cosine distance (1 − cos) over all unordered pairs; NaN with fewer than two embeddings."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or len(embeddings) < 2:
        return float("nan")
    unit = l2_normalize(embeddings, "kept-set embeddings")
    cosine = unit @ unit.T
    upper = np.triu_indices(len(unit), k=1)
    return float(np.mean(1.0 - cosine[upper]))


def mean_pairwise_euclidean(embeddings: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs (The Chosen One's measure); NaN with fewer than two."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or len(embeddings) < 2:
        return float("nan")
    upper = np.triu_indices(len(embeddings), k=1)
    differences = embeddings[upper[0]] - embeddings[upper[1]]
    return float(np.mean(np.linalg.norm(differences, axis=1)))


def prompt_distances(prompts: Sequence[str], embeddings: np.ndarray) -> dict[str, float]:
    """Per prompt, ``mean_pairwise_euclidean`` of the embeddings of all its images (``prompts[i]`` is image i's)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if len(prompts) != len(embeddings):
        raise CastloraError(f"prompt_distances: {len(prompts)} prompts but {len(embeddings)} embeddings.")
    rows = np.asarray(prompts, dtype=object)
    return {p: mean_pairwise_euclidean(embeddings[rows == p]) for p in dict.fromkeys(prompts)}


def summarize_round(
    round_index: int,
    scores: pd.DataFrame,
    kept: pd.DataFrame,
    kept_distance: float,
    round0_distance: float | None,
    per_prompt_distances: dict[str, float] | None = None,
) -> RoundSummary:
    """A round's numbers; ``round0_distance`` None means this is round 0; ``per_prompt_distances`` from
    ``prompt_distances`` (the largest finite one becomes ``prompt_distance``)."""
    finite = [d for d in (per_prompt_distances or {}).values() if np.isfinite(d)]
    reference = kept_distance if round0_distance is None else round0_distance
    ratio = kept_distance / reference if reference and np.isfinite(reference) and reference > 0 else float("nan")
    return RoundSummary(
        round=round_index,
        n_generated=len(scores),
        n_kept=len(kept),
        dnc_median=float(scores["score"].median()) if len(scores) else float("nan"),
        dnc_median_kept=float(kept["score"].median()) if len(kept) else float("nan"),
        kept_distance=float(kept_distance),
        distance_ratio=float(ratio),
        count_fail_rate=float(scores["reason"].notna().mean()) if len(scores) else float("nan"),
        prompt_distance=float(max(finite)) if finite else float("nan"),
    )


def stop_reason(history: Sequence[RoundSummary], config: IterationConfig) -> str | None:
    """Why the loop stops after the last round of ``history``, or None to train another round.

    Checked in order: nothing kept (no data to train on), identities converged (``config.convergence``'s rule:
    ``distance`` or ``prompt_distance``), D&C stopped improving, the round budget is spent.
    """
    if not history:
        raise CastloraError("stop_reason needs at least one finished round.")
    if config.max_rounds is None:
        raise CastloraError("IterationConfig.max_rounds is not set: resolve it against a model preset first.")
    last = history[-1]
    if last.n_kept == 0:
        return STOP_NOTHING_KEPT
    per_prompt = config.convergence == CONVERGENCE_PER_PROMPT and config.d_conv is not None
    if per_prompt and np.isfinite(last.prompt_distance) and last.prompt_distance < config.d_conv:
        return STOP_PROMPT_DISTANCE
    if len(history) > 1:
        kept_ratio = config.convergence == CONVERGENCE_KEPT_RATIO
        if kept_ratio and np.isfinite(last.distance_ratio) and last.distance_ratio < config.distance_fraction:
            return STOP_DISTANCE
        best_before = max(r.dnc_median for r in history[:-1])
        if not last.dnc_median > best_before + config.min_improvement:
            return STOP_NO_IMPROVEMENT
    if len(history) >= config.max_rounds:
        return STOP_MAX_ROUNDS
    return None


def best_round(history: Sequence[RoundSummary]) -> int:
    """The round whose model scored the highest median D&C (the earliest on a tie): the loop's result."""
    if not history:
        raise CastloraError("best_round needs at least one finished round.")
    medians = [r.dnc_median if np.isfinite(r.dnc_median) else -np.inf for r in history]
    return int(history[int(np.argmax(medians))].round)


def preference_pairs(scores: pd.DataFrame, margin: float) -> list[tuple[str, str]]:
    """(winner, loser) image paths: per prompt, the best-scoring image against the worst one.

    Images of one prompt share the text and differ only by seed (and layout), so the pair isolates what D&C
    measures: whether each character keeps its identity. Count-gate failures are valid losers. Pairs with a
    gap below ``margin`` are dropped.
    """
    missing = {"image_path", "score", "prompt"} - set(scores.columns)
    if missing:
        raise CastloraError(f"preference_pairs: the scores table lacks columns {sorted(missing)}.")
    pairs = []
    for _, group in scores.groupby("prompt", sort=True):
        if len(group) < 2:
            continue
        ranked = group.sort_values(["score", "image_path"], ascending=[False, True], kind="stable")
        winner, loser = ranked.iloc[0], ranked.iloc[-1]
        if winner["score"] - loser["score"] >= margin:
            pairs.append((str(winner["image_path"]), str(loser["image_path"])))
    return pairs
