"""Keeping, convergence and preference pairs of the iterative loop (pure rules, no models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import CastloraError
from pipeline.iteration import (
    STOP_DISTANCE,
    STOP_MAX_ROUNDS,
    STOP_NO_IMPROVEMENT,
    STOP_NOTHING_KEPT,
    IterationConfig,
    RoundSummary,
    best_round,
    mean_pairwise_distance,
    preference_pairs,
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


def summary(round_index, median, distance_ratio, n_kept=5):
    return RoundSummary(round_index, 20, n_kept, median, median + 0.1, 0.5 * distance_ratio, distance_ratio, 0.1)


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
