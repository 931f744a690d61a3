"""D&C maths against MuDI's golden values (docs/design.md#golden-values) and the fixes of the default mode."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.dnc.metric import (
    COUNT_MISMATCH,
    MODES,
    dnc_from_similarities,
    get_mode,
    reference_gram,
)
from pipeline.errors import CastloraError

BOX0 = [np.array([0.30, 0.20, 0.25]), np.array([0.70, 0.80, 0.75])]
BOX1 = [np.array([0.60, 0.70, 0.65]), np.array([0.20, 0.30, 0.25])]
G_GOLDEN = np.array([[0.80, 0.30], [0.30, 0.85]])


def test_mudi_mode_reproduces_golden_score_exactly():
    mode = MODES["mudi"]
    result = dnc_from_similarities([BOX0, BOX1], G_GOLDEN, mode.assignment, mode.norm)
    assert result.score == 0.8190983005625052
    assert result.assignment == (1, 0)
    assert result.reason is None
    np.testing.assert_allclose(result.S_aligned, [[0.65, 0.25], [0.25, 0.75]])


def test_frobenius_variant_golden():
    result = dnc_from_similarities([BOX0, BOX1], G_GOLDEN, "greedy", "frobenius")
    assert result.score == pytest.approx(0.806350832689629, abs=1e-15)


def test_reference_gram_golden_with_self_pairs():
    e0 = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]])
    e1 = np.array([[0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    np.testing.assert_allclose(reference_gram([e0, e1], include_self=True), [[0.9, 0.09], [0.09, 0.9]], atol=1e-12)


def test_reference_gram_normalises_inside_and_can_drop_self_pairs():
    e0 = np.array([[2.0, 0.0, 0.0], [4.0, 3.0, 0.0]])  # norms 2 and 5: same directions as the golden refs
    e1 = np.array([[0.0, 0.0, 5.0], [0.0, 0.3, 0.4]])
    with_self = reference_gram([e0, e1], include_self=True)
    without = reference_gram([e0, e1], include_self=False)
    np.testing.assert_allclose(with_self, [[0.9, 0.09], [0.09, 0.9]], atol=1e-12)
    # Without the 1.0 self-pairs the diagonal is the one cross pair (0.8); off-diagonal blocks are unchanged.
    np.testing.assert_allclose(without, [[0.8, 0.09], [0.09, 0.8]], atol=1e-12)


def test_gram_without_self_pairs_needs_two_references():
    with pytest.raises(CastloraError, match="one reference"):
        reference_gram([np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [0.6, 0.8]])], include_self=False)


def test_hungarian_beats_greedy_where_greedy_is_fooled():
    g = np.array([[0.9, 0.09], [0.09, 0.9]])
    # S = [[0.9, 0.85], [0.88, 0.1]]: greedy lets subject 0 grab box 0 and leaves subject 1 the bad box.
    sims = [[np.array([0.9]), np.array([0.85])], [np.array([0.88]), np.array([0.1])]]
    greedy = dnc_from_similarities(sims, g, "greedy", "spectral")
    hungarian = dnc_from_similarities(sims, g, "hungarian", "spectral")
    assert greedy.assignment == (0, 1)
    assert hungarian.assignment == (1, 0)
    aligned_trace = np.trace(hungarian.S_aligned)
    assert aligned_trace == pytest.approx(0.88 + 0.85) and aligned_trace > np.trace(greedy.S_aligned)
    assert hungarian.score > greedy.score


def test_count_gate_scores_zero_with_reason():
    one_box = dnc_from_similarities([BOX0], G_GOLDEN)
    three_boxes = dnc_from_similarities([BOX0, BOX1, BOX0], G_GOLDEN)
    no_box = dnc_from_similarities([], G_GOLDEN)
    for result, boxes in ((one_box, 1), (three_boxes, 3), (no_box, 0)):
        assert result.score == 0.0
        assert result.reason == COUNT_MISMATCH
        assert result.assignment is None and result.S_aligned is None
        assert result.S.shape == (boxes, 2)


def test_score_is_not_clipped_and_perfect_match_scores_one():
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    perfect = dnc_from_similarities([[np.array([0.0]), np.array([1.0])], [np.array([1.0]), np.array([0.0])]], g)
    assert perfect.score == pytest.approx(1.0) and perfect.assignment == (1, 0)
    awful = dnc_from_similarities([[np.array([-1.0]), np.array([-1.0])], [np.array([-1.0]), np.array([-1.0])]], g)
    assert awful.score == pytest.approx(-2.0)  # ‖[[-2, -1], [-1, -2]]‖₂ = 3


def test_bad_inputs_are_named():
    with pytest.raises(CastloraError, match="assignment"):
        dnc_from_similarities([BOX0, BOX1], G_GOLDEN, assignment="random")
    with pytest.raises(CastloraError, match="norm"):
        dnc_from_similarities([BOX0, BOX1], G_GOLDEN, norm="nuclear")
    with pytest.raises(CastloraError, match="Box 1 has similarities for 1 subjects"):
        dnc_from_similarities([BOX0, BOX1[:1]], G_GOLDEN)
    with pytest.raises(CastloraError, match="square"):
        dnc_from_similarities([BOX0], np.ones((2, 3)))
    with pytest.raises(CastloraError, match="Unknown D&C mode"):
        get_mode("fast")
