"""The evaluation stage on tiny models: one grid for every variant, long metrics, unavailable stays unavailable."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.evaluation.report import training_markdown
from pipeline.rendering import GenerationSettings
from pipeline.stages.evaluation import (
    BASELINE_DIR,
    EvaluationReport,
    EvaluationScoring,
    Subject,
    Variant,
    clip_text,
    image_reward_note,
    run_evaluation,
    subject_similarity,
    train_baseline,
    training_settings,
)
from pipeline.stages.lora import current_lora
from pipeline.storage.lineage import LineageRecorder, read_lineage
from tests.pipeline.quality.conftest import SIDE, layout_for

SUBJECTS = [Subject("olis", "dog", "olis dog"), Subject("vrin", "dog", "vrin dog")]
GENERATION = GenerationSettings(("olis dog and vrin dog in a park",), SIDE, 2, 5.0, None)
LAYOUTS_MADE: list[int] = []  # the seeds the evaluation asked the layout factory for, in order


def counted_layout(seed: int):
    LAYOUTS_MADE.append(seed)
    return layout_for(seed)


@pytest.fixture(scope="module")
def evaluated(quality, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    lora = quality.base.as_current()
    variants = [
        Variant("segmix", lora, None),
        Variant("segmix_init", lora, 1.0, "init γ=1"),
        Variant("base", None, None),
    ]
    recorder = LineageRecorder(root / "lineage", "run", "evaluation", "olis__vrin", "test")
    scoring = EvaluationScoring(quality.scorer, quality.scorer.unavailable, None, "no CLIP configured",
                                image_reward_note(""))  # fmt: skip
    out = run_evaluation(
        pipe_factory=quality.factory, variants=variants, scoring=scoring, layout_factory=counted_layout,
        generation=GENERATION, seeds=[5, 6], subjects=SUBJECTS, out_dir=root / "out", recorder=recorder,
        base_model_id="tiny-sdxl", report=EvaluationReport(segmix_lora=lora), log=lambda _: None,
    )  # fmt: skip
    return out


def test_every_variant_renders_the_same_grid(evaluated):
    metrics = evaluated.metrics
    grid = metrics.groupby("variant")[["prompt", "seed"]].apply(lambda g: sorted(set(map(tuple, g.values))))
    assert list(grid.index) == ["base", "segmix", "segmix_init"]
    assert (
        grid["base"]
        == grid["segmix"]
        == grid["segmix_init"]
        == [(GENERATION.prompts[0], 5), (GENERATION.prompts[0], 6)]
    )


def test_each_seeds_layout_is_composed_once_for_all_variants(evaluated):
    assert sorted(LAYOUTS_MADE) == [5, 6]


def test_metrics_are_long_and_unavailable_is_never_a_number(evaluated):
    metrics = pd.read_parquet(evaluated.folder / "metrics.parquet")
    ok = metrics[metrics["status"] == "ok"]
    assert {"dnc_default:dinov2", "dnc_mudi:dinov2", "subject_sim:dinov2", "count_fail"} <= set(ok["metric"])
    assert ok["value"].notna().all()
    missing = metrics[metrics["status"] == "unavailable"]
    assert {"dnc_default:clip", "clip_t", "image_reward", "dnc_default:dreamsim_style"} <= set(missing["metric"])
    assert missing["value"].isna().all() and (missing["note"] != "").all()
    per_subject = ok[ok["metric"] == "subject_sim:dinov2"]
    assert set(per_subject["subject"]) == {"olis", "vrin"}
    assert (ok[ok["metric"] == "count_fail"]["value"] == 0.0).all()  # layout boxes: always one per character


def test_report_plots_and_grids(evaluated):
    report = (evaluated.folder / "report.md").read_text()
    assert report == evaluated.report
    for text in ("segmix_init", "unavailable", "no CLIP configured", "no ImageReward weights configured", "init γ=1"):
        assert text in report
    for path in [*evaluated.plots.values(), *evaluated.grids.values()]:
        with Image.open(path) as image:
            assert image.width > 100 and image.height > 100
    assert set(evaluated.grids) == {"segmix", "segmix_init", "base"}


def test_clip_text_replaces_identifiers_with_nouns():
    assert clip_text("A photo of Olis dog and vrin dog on a sofa", SUBJECTS) == "A photo of dog and dog on a sofa"


def test_subject_similarity_follows_assignment_or_best_box():
    record = {"S_json": json.dumps([[0.1, 0.9], [0.8, 0.2]]), "assignment_json": json.dumps([1, 0])}
    assert subject_similarity(record, 0) == pytest.approx(0.8) and subject_similarity(record, 1) == pytest.approx(0.9)
    lone = {"S_json": json.dumps([[0.3, 0.6]]), "assignment_json": "null"}
    assert subject_similarity(lone, 0) == pytest.approx(0.3) and subject_similarity(lone, 1) == pytest.approx(0.6)
    assert subject_similarity({"S_json": "[]", "assignment_json": "null"}, 0) is None
    assert np.isfinite(subject_similarity(record, 1))


def test_empty_grid_is_refused(quality, tmp_path):
    with pytest.raises(CastloraError, match="at least one prompt"):
        run_evaluation(
            pipe_factory=quality.factory, variants=[Variant("base", None, None)],
            scoring=EvaluationScoring(quality.scorer, {}, None, "", ""), layout_factory=layout_for,
            generation=GenerationSettings((), SIDE, 2, 5.0, None), seeds=[1], subjects=SUBJECTS, out_dir=tmp_path,
            recorder=None, base_model_id="tiny-sdxl",
        )  # fmt: skip


def test_dreambooth_baseline_is_a_recorded_output_trained_like_the_segmix_lora(quality, tmp_path):
    # The fixture's LoRA trained a constant schedule for 2 steps (not the dataclass default 500); pretend it used
    # Seg-Mix so the baseline has something to switch off.
    segmix = quality.base.as_current()
    segmix = dataclasses.replace(segmix, train_record={**segmix.train_record, "segmix_p": 0.3})
    recorder = LineageRecorder(tmp_path / "lineage", "run", "evaluation", "olis__vrin", "test")
    out_dir = tmp_path / "evaluation"
    baseline = train_baseline(
        pipe=quality.factory(), segmix_lora=segmix, samples_for=lambda config: quality.samples, out_dir=out_dir,
        cache_dir=quality.root / "cache", recorder=recorder, base_model_id="tiny-sdxl",
    )  # fmt: skip
    recorder.flush()
    assert baseline.config == dataclasses.replace(quality.train_config, segmix_p=0.0)
    assert baseline.result.steps_done == 2
    assert segmix.train_config().differences(baseline.config) == {"segmix_p": (0.3, 0.0)}
    # Its files, version and record live in the evaluation's own folder, and lineage lists them.
    assert baseline.folder == out_dir / BASELINE_DIR / baseline.version
    assert all(path.parent == baseline.folder and path.is_file() for path in baseline.files.values())
    assert current_lora(out_dir / BASELINE_DIR).version == baseline.version
    lineage = read_lineage(tmp_path / "lineage").to_pandas()
    assert {str(p) for p in baseline.files.values()} <= set(lineage["artifact_uri"])
    row = lineage[lineage["artifact_uri"] == str(baseline.files["diffusers"])].iloc[0]
    params = json.loads(row["params_json"])
    assert params["train_steps"] == 2 and params["segmix_p"] == 0.0 and params["gradient_checkpointing"] is False

    variants = [Variant("dreambooth", baseline.as_current(), None), Variant("segmix", segmix, None)]
    training = training_settings([*variants, Variant("base", None, None)], segmix, "sdxl", "tiny:sdxl")
    rows = training.set_index("variant")
    assert set(rows["family"]) == {"sdxl"} and set(rows["base_model"]) == {"tiny:sdxl"}  # side by side with FLUX
    assert rows.loc["dreambooth", "differs_from_segmix"] == "segmix_p: 0.3 → 0"
    assert rows.loc["segmix", "differs_from_segmix"] == "nothing"
    assert rows.loc["dreambooth", "steps"] == rows.loc["segmix", "steps"] == 2
    assert rows.loc["dreambooth", "segmix_p"] == 0.0 and rows.loc["segmix", "segmix_p"] == 0.3
    assert rows.loc["base", "lora"] == "base model (no LoRA)"
    # The base row has no steps; the others still read as whole numbers in the report, not "2.000".
    dreambooth_line = next(line for line in training_markdown(training).splitlines() if line.startswith("| dreambooth"))
    assert "| 2 |" in dreambooth_line, dreambooth_line


def test_report_states_the_training_settings_of_each_variant(evaluated):
    assert "## Training settings" in evaluated.report
    assert list(evaluated.training["variant"]) == ["segmix", "segmix_init", "base"]
    assert (evaluated.training["differs_from_segmix"][:2] == "nothing").all()
