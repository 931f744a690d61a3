"""Keeping, convergence and preference pairs of the iterative loop (pure rules, no models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import CastloraError
from pipeline.iteration_rules import (
    STOP_DISTANCE,
    STOP_MAX_ROUNDS,
    STOP_NO_IMPROVEMENT,
    STOP_NOTHING_KEPT,
    STOP_PROMPT_DISTANCE,
    IterationConfig,
    RoundSummary,
    best_round,
    mean_pairwise_distance,
    mean_pairwise_euclidean,
    preference_pairs,
    prompt_distances,
    select_kept,
    stop_reason,
    summarize_round,
)


def scores_frame(values, reasons=None, prompts=None) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame(
        {
            "image_path": [f"img_{i:02d}.png" for i in range(n)],
            "score": values,
            "reason": reasons or [None] * n,
            "prompt": prompts or ["p"] * n,
        }
    )


def summary(round_index, median, distance_ratio, n_kept=5, prompt_distance=float("nan")):
    return RoundSummary(
        round_index, 20, n_kept, median, median + 0.1, 0.5 * distance_ratio, distance_ratio, 0.1,
        prompt_distance=prompt_distance,
    )  # fmt: skip


def test_select_kept_applies_count_gate_threshold_and_top_m():
    scores = scores_frame([0.9, 0.0, 0.5, 0.7, 0.2, 0.7], reasons=[None, "count_mismatch", None, None, None, None])
    kept = select_kept(scores, keep_top=3, min_dnc=None)
    assert kept["image_path"].tolist() == ["img_00.png", "img_03.png", "img_05.png"]  # tie 0.7 broken by path
    kept = select_kept(scores, keep_top=10, min_dnc=0.5)
    assert kept["image_path"].tolist() == ["img_00.png", "img_03.png", "img_05.png", "img_02.png"]
    assert "img_01.png" not in select_kept(scores, keep_top=10, min_dnc=-1.0)["image_path"].tolist()


def test_select_kept_ignores_row_order():
    scores = scores_frame([0.3, 0.8, 0.8, 0.1])
    shuffled = scores.sample(frac=1.0, random_state=3)
    assert select_kept(scores, 2, None)["image_path"].tolist() == select_kept(shuffled, 2, None)["image_path"].tolist()


def test_mean_pairwise_distance():
    same = np.tile([[1.0, 0.0]], (4, 1))
    assert mean_pairwise_distance(same) == pytest.approx(0.0)
    orthogonal = np.array([[1.0, 0.0], [0.0, 3.0]])
    assert mean_pairwise_distance(orthogonal) == pytest.approx(1.0)
    spread = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert mean_pairwise_distance(spread) == pytest.approx((1 + 2 + 1) / 3)
    assert np.isnan(mean_pairwise_distance(np.ones((1, 3))))


def test_summarize_round_ratio_against_round_zero():
    scores = scores_frame([0.2, 0.4, 0.0, 0.6], reasons=[None, None, "count_mismatch", None])
    kept = select_kept(scores, 2, None)
    first = summarize_round(0, scores, kept, kept_distance=0.5, round0_distance=None)
    later = summarize_round(1, scores, kept, kept_distance=0.3, round0_distance=0.5)
    assert first.distance_ratio == 1.0 and later.distance_ratio == pytest.approx(0.6)
    assert first.dnc_median == pytest.approx(0.3) and first.dnc_median_kept == pytest.approx(0.5)
    assert first.count_fail_rate == pytest.approx(0.25)
    assert (first.n_generated, first.n_kept) == (4, 2)


def test_convergence_stops_the_loop():
    config = IterationConfig(images_per_round=20, keep_top=5, max_rounds=5, distance_fraction=0.8)
    history = [summary(0, 0.30, 1.0)]
    assert stop_reason(history, config) is None
    history.append(summary(1, 0.35, 0.9))
    assert stop_reason(history, config) is None
    history.append(summary(2, 0.40, 0.75))  # kept set tightened below 0.8 x round 0
    assert stop_reason(history, config) == STOP_DISTANCE


def test_no_improvement_and_max_rounds_and_nothing_kept():
    config = IterationConfig(images_per_round=20, keep_top=5, max_rounds=3, min_improvement=0.01)
    assert stop_reason([summary(0, 0.3, 1.0), summary(1, 0.305, 0.95)], config) == STOP_NO_IMPROVEMENT
    climbing = [summary(0, 0.3, 1.0), summary(1, 0.4, 0.95), summary(2, 0.5, 0.9)]
    assert stop_reason(climbing, config) == STOP_MAX_ROUNDS
    assert stop_reason([summary(0, 0.0, float("nan"), n_kept=0)], config) == STOP_NOTHING_KEPT
    assert stop_reason([summary(0, 0.3, 1.0)], IterationConfig(images_per_round=5, keep_top=5, max_rounds=1)) == (
        STOP_MAX_ROUNDS
    )


def test_best_round_is_highest_median_earliest_on_tie():
    history = [summary(0, 0.3, 1.0), summary(1, 0.5, 0.9), summary(2, 0.5, 0.8), summary(3, 0.4, 0.7)]
    assert best_round(history) == 1


def test_preference_pairs_per_prompt_with_margin():
    scores = scores_frame(
        [0.9, 0.1, 0.5, 0.52, 0.49, 0.0],
        reasons=[None, None, None, None, None, "count_mismatch"],
        prompts=["a", "a", "b", "b", "c", "c"],
    )
    pairs = preference_pairs(scores, margin=0.05)
    assert pairs == [("img_00.png", "img_01.png"), ("img_04.png", "img_05.png")]  # prompt b is a near-tie


def test_config_is_validated():
    with pytest.raises(CastloraError, match="keep_top=60 cannot exceed"):
        IterationConfig(images_per_round=50, keep_top=60)
    with pytest.raises(CastloraError, match="dnc_mode"):
        IterationConfig(dnc_mode="fast")
    with pytest.raises(CastloraError, match="lacks columns"):
        select_kept(pd.DataFrame({"score": [1.0]}), 1, None)


def test_prompt_distance_is_per_prompt_over_all_images_euclidean():
    assert mean_pairwise_euclidean(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert np.isnan(mean_pairwise_euclidean(np.ones((1, 3))))
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    distances = prompt_distances(["a", "a", "b", "b", "c"], embeddings)
    assert distances["a"] == pytest.approx(np.sqrt(2)) and distances["b"] == 0.0 and np.isnan(distances["c"])
    scores = scores_frame([0.5] * 5, prompts=["a", "a", "b", "b", "c"])
    round0 = summarize_round(0, scores, select_kept(scores, 2, None), 0.4, None, distances)
    assert round0.prompt_distance == pytest.approx(np.sqrt(2))  # the worst prompt decides; NaN prompts are ignored


def test_per_prompt_rule_stops_on_the_absolute_threshold_and_says_so():
    config = IterationConfig(images_per_round=20, keep_top=5, max_rounds=5, convergence="per_prompt", d_conv=0.5)
    # The kept set tightened a lot (ratio 0.1) but that is the other rule's number: per_prompt ignores it.
    assert stop_reason([summary(0, 0.3, 1.0, prompt_distance=0.7), summary(1, 0.4, 0.1, prompt_distance=0.6)],
                       config) is None  # fmt: skip
    last = summary(2, 0.5, 0.1, prompt_distance=0.45)
    history = [summary(0, 0.3, 1.0, prompt_distance=0.7), summary(1, 0.4, 0.1, prompt_distance=0.6), last]
    assert stop_reason(history, config) == STOP_PROMPT_DISTANCE
    # Absolute: already-consistent images stop at round 0.
    assert stop_reason([summary(0, 0.3, 1.0, prompt_distance=0.2)], config) == STOP_PROMPT_DISTANCE
    stopped = RoundSummary(**{**last.__dict__, "stop_reason": STOP_PROMPT_DISTANCE})
    assert stopped.converged


def test_kept_ratio_rule_ignores_the_prompt_distance():
    config = IterationConfig(images_per_round=20, keep_top=5, max_rounds=5)
    assert config.convergence == "kept_ratio"
    assert stop_reason([summary(0, 0.3, 1.0, prompt_distance=0.0), summary(1, 0.4, 0.9, prompt_distance=0.0)],
                       config) is None  # fmt: skip
    assert stop_reason([summary(0, 0.3, 1.0), summary(1, 0.4, 0.7)], config) == STOP_DISTANCE


def test_convergence_settings_are_validated():
    with pytest.raises(CastloraError, match="convergence='per_prompt' needs d_conv > 0"):
        IterationConfig(convergence="per_prompt")
    with pytest.raises(CastloraError, match=r"d_conv=0\.3 is used only by convergence='per_prompt'"):
        IterationConfig(d_conv=0.3)
    with pytest.raises(CastloraError, match="convergence='chosen' must be one of"):
        IterationConfig(convergence="chosen")
