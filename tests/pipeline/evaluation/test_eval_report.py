"""Summary, markdown report and plots built from synthetic metric tables with known values."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.evaluation.report import (
    UNAVAILABLE,
    UNDEFINED,
    availability,
    headline,
    plot_rounds,
    plot_score_distributions,
    render_markdown,
    summarize,
)

VARIANTS = ["segmix", "dreambooth", "iterative"]  # deliberately not alphabetical
NO_REWARD = "no ImageReward weights configured"


def _row(variant: str, image: int, metric: str, value: float, subject: str = "", status: str = "ok", note: str = ""):
    return {
        "variant": variant,
        "image_path": f"/data/{variant}/{image}.png",
        "prompt_index": image // 2,
        "prompt": f"prompt {image // 2}",
        "seed": image % 2,
        "metric": metric,
        "subject": subject,
        "value": value if status == "ok" else math.nan,
        "status": status,
        "note": note,
    }


# Per-image values chosen so each variant's mean is known: (dnc_default:dinov2, dnc_mudi:dinov2, count_fail, sim olis)
KNOWN = {
    "segmix": [(0.40, 0.30, 0.0, 0.70), (0.60, 0.50, 0.0, 0.90)],  # means 0.5, 0.4, 0.0, 0.8
    "dreambooth": [(0.10, 0.05, 1.0, None), (0.30, 0.15, 0.0, 0.50)],  # means 0.2, 0.1, 0.5, 0.5 (one undefined)
    "iterative": [(0.70, 0.60, 0.0, 0.80), (0.50, 0.40, 0.0, 0.60)],  # means 0.6, 0.5, 0.0, 0.7
}


def make_metrics(reward_status: str = "unavailable") -> pd.DataFrame:
    rows = []
    for variant in VARIANTS:
        for image, (dnc, mudi, fail, sim) in enumerate(KNOWN[variant]):
            rows.append(_row(variant, image, "dnc_default:dinov2", dnc))
            rows.append(_row(variant, image, "dnc_mudi:dinov2", mudi))
            rows.append(
                _row(
                    variant,
                    image,
                    "dnc_default:dreamsim_style",
                    math.nan,
                    status="unavailable",
                    note="no DreamSim weights",
                )
            )
            rows.append(_row(variant, image, "count_fail", fail))
            if sim is None:
                rows.append(
                    _row(
                        variant,
                        image,
                        "subject_sim:dinov2",
                        math.nan,
                        "olis",
                        status="undefined",
                        note="count mismatch",
                    )
                )
            else:
                rows.append(_row(variant, image, "subject_sim:dinov2", sim, "olis"))
            rows.append(_row(variant, image, "subject_sim:dinov2", 0.25 + 0.5 * image, "mabel"))
            if reward_status == "ok":
                rows.append(_row(variant, image, "image_reward", 1.0 + image))
            else:
                rows.append(_row(variant, image, "image_reward", math.nan, status="unavailable", note=NO_REWARD))
    return pd.DataFrame(rows)


def make_rounds() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "round": [0, 1, 2],
            "n_generated": [8, 8, 8],
            "n_kept": [4, 4, 3],
            "dnc_median": [0.21, 0.28, 0.31],
            "dnc_median_kept": [0.35, 0.41, 0.44],
            "kept_distance": [0.9, 0.8, 0.6],
            "distance_ratio": [1.0, 0.889, 0.667],
            "converged": [False, False, True],
            "stop_reason": [None, None, "distance"],
        }
    )


@pytest.fixture(scope="module")
def metrics() -> pd.DataFrame:
    return make_metrics()


@pytest.fixture(scope="module")
def summary(metrics: pd.DataFrame) -> pd.DataFrame:
    return summarize(metrics)


def test_summary_means_match_known_values(summary: pd.DataFrame) -> None:
    table = summary.set_index("variant")
    for variant, per_image in KNOWN.items():
        dnc, mudi, fail = (np.mean([values[i] for values in per_image]) for i in range(3))
        assert table.loc[variant, "dnc_default:dinov2"] == pytest.approx(dnc)
        assert table.loc[variant, "dnc_mudi:dinov2"] == pytest.approx(mudi)
        assert table.loc[variant, "count_fail_rate"] == pytest.approx(fail)
        sims = [s for *_, s in per_image if s is not None]
        assert table.loc[variant, "subject_sim:dinov2[olis]"] == pytest.approx(np.mean(sims))
        assert table.loc[variant, "subject_sim:dinov2[mabel]"] == pytest.approx(0.5)
        assert table.loc[variant, "n_images"] == 2
    assert "count_fail" not in summary.columns


def test_variant_order_is_first_appearance(metrics: pd.DataFrame) -> None:
    assert list(summarize(metrics)["variant"]) == VARIANTS
    reordered = pd.concat([metrics[metrics["variant"] == "iterative"], metrics[metrics["variant"] != "iterative"]])
    assert list(summarize(reordered)["variant"]) == ["iterative", "segmix", "dreambooth"]


def test_unavailable_is_never_a_number(summary: pd.DataFrame, metrics: pd.DataFrame) -> None:
    for column in ("image_reward", "dnc_default:dreamsim_style"):
        assert list(summary[column]) == [UNAVAILABLE] * len(VARIANTS)
        # Coercing to numbers must give NaN, not 0: a reader summing columns cannot mistake it for a score.
        assert pd.to_numeric(summary[column], errors="coerce").isna().all()
    notes = availability(metrics)
    assert notes == {"dnc_default:dreamsim_style": "no DreamSim weights", "image_reward": NO_REWARD}


def test_all_undefined_subject_is_undefined_not_unavailable() -> None:
    frame = make_metrics()
    olis = frame["subject"] == "olis"
    frame.loc[olis, ["status", "value"]] = ["undefined", math.nan]
    summary = summarize(frame)
    assert list(summary["subject_sim:dinov2[olis]"]) == [UNDEFINED] * len(VARIANTS)
    assert "subject_sim:dinov2" not in availability(frame)


def test_partially_unavailable_metric_names_the_variants() -> None:
    frame = make_metrics(reward_status="ok")
    drop = (frame["variant"] == "iterative") & (frame["metric"] == "image_reward")
    frame.loc[drop, ["status", "value", "note"]] = ["unavailable", math.nan, NO_REWARD]
    summary = summarize(frame).set_index("variant")
    assert summary.loc["segmix", "image_reward"] == pytest.approx(1.5)
    assert summary.loc["iterative", "image_reward"] == UNAVAILABLE
    assert availability(frame)["image_reward"] == f"{NO_REWARD} (only for: iterative)"


def test_metric_missing_for_a_variant_is_unavailable() -> None:
    frame = make_metrics()
    frame = frame[~((frame["variant"] == "segmix") & (frame["metric"] == "dnc_mudi:dinov2"))]
    assert summarize(frame).set_index("variant").loc["segmix", "dnc_mudi:dinov2"] == UNAVAILABLE
    assert "not computed for segmix" in availability(frame)["dnc_mudi:dinov2"]


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match="status"):
        summarize(make_metrics().drop(columns=["status"]))


def test_headline_picks_best_and_gain_over_baseline(summary: pd.DataFrame) -> None:
    top = headline(summary)
    assert top is not None
    assert top.metric == "dnc_default:dinov2"  # dreamsim_style is unavailable, dinov2 is preferred anyway
    assert top.best_variant == "iterative"
    assert top.best_value == pytest.approx(0.6)
    assert top.gain == pytest.approx(0.6 - 0.2)
    assert top.relative_gain == pytest.approx(2.0)


def test_headline_falls_back_to_next_embedder_and_handles_no_baseline() -> None:
    frame = make_metrics()
    frame = frame[frame["variant"] != "dreambooth"]
    dino = frame["metric"] == "dnc_default:dinov2"
    frame.loc[dino, ["status", "value"]] = ["unavailable", math.nan]
    clip = frame[dino].assign(metric="dnc_default:clip", status="ok")
    clip["value"] = np.where(clip["variant"] == "segmix", 0.9, 0.1)
    top = headline(summarize(pd.concat([frame, clip])))
    assert top is not None and top.metric == "dnc_default:clip" and top.best_variant == "segmix"
    assert top.gain is None
    assert "no `dreambooth` baseline" in top.sentence()


def test_markdown_has_headline_tables_rounds_and_unavailable(summary: pd.DataFrame, metrics: pd.DataFrame) -> None:
    text = render_markdown(
        summary, availability(metrics), make_rounds(), "Olis & Mabel", ["tiny models: numbers are noise"]
    )
    lines = text.splitlines()
    assert lines[0] == "# Olis & Mabel"
    assert "`iterative`" in text and "+0.400" in text and "+200%" in text
    # Transposed summary: one row per metric, one column per variant, in table order, 3 decimals, best in bold.
    assert "| metric | segmix | dreambooth | iterative |" in lines
    assert "| dnc_default:dinov2 | 0.500 | 0.200 | **0.600** |" in lines
    assert "| count_fail_rate (lower is better) | **0.000** | 0.500 | **0.000** |" in lines  # tie: both bold
    assert "| subject_sim:dinov2[mabel] | 0.500 | 0.500 | 0.500 |" in lines  # all equal: nothing bold
    assert "| image_reward | _unavailable_ | _unavailable_ | _unavailable_ |" in lines
    assert f"- `image_reward`: {NO_REWARD}" in lines
    assert "| 2 | 8 | 3 | 0.310 | 0.440 | 0.600 | 0.667 | yes | distance |" in lines
    assert "**Stopped after round 2: `distance`**" in text
    assert "- tiny models: numbers are noise" in lines
    # Every table row has the same number of pipes as its header (renders as a GitHub table).
    blocks = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert len(blocks) == 2
    for block in blocks:
        assert block[1].startswith("|---|")
        assert len({line.count("|") for line in block}) == 1


def test_markdown_without_rounds_or_dnc() -> None:
    frame = make_metrics()
    frame = frame[~frame["metric"].str.startswith("dnc_")]
    text = render_markdown(summarize(frame), {}, None, "t", [])
    assert "no headline" in text
    assert "Iterative training rounds" not in text
    assert "_none: every metric was computed_" in text


def test_markdown_rounds_not_stopped() -> None:
    rounds = make_rounds().iloc[:2]
    text = render_markdown(summarize(make_metrics()), {}, rounds, "t", [])
    assert "Not stopped yet" in text


def _assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (600, 350)
        assert len(set(image.convert("L").getdata())) > 2  # something was drawn


def test_plots_write_pngs_without_leaking_figures(metrics: pd.DataFrame, tmp_path) -> None:
    before = plt.get_fignums()
    paths = [
        plot_score_distributions(metrics, "dnc_default:dinov2", tmp_path / "dnc.png"),
        plot_score_distributions(metrics, "subject_sim:dinov2[olis]", tmp_path / "olis.png"),
        plot_score_distributions(metrics, "image_reward", tmp_path / "reward.png"),
        plot_score_distributions(metrics, "no_such_metric", tmp_path / "missing.png"),
        plot_rounds(make_rounds(), tmp_path / "rounds.png", distance_threshold=0.8),
        plot_rounds(None, tmp_path / "no_rounds.png"),
    ]
    for path in paths:
        assert path.parent == tmp_path
        _assert_png(path)
    assert plt.get_fignums() == before


def test_unavailable_plot_differs_from_real_plot(metrics: pd.DataFrame, tmp_path) -> None:
    """The all-unavailable plot is a message, not an empty axis: far fewer ink pixels than a real one."""

    def ink(path) -> int:
        with Image.open(path) as image:
            return int((np.asarray(image.convert("L")) < 200).sum())

    real = plot_score_distributions(metrics, "dnc_default:dinov2", tmp_path / "a.png")
    unavailable = plot_score_distributions(metrics, "image_reward", tmp_path / "b.png")
    assert 0 < ink(unavailable) < ink(real)
