"""The evaluation renders and scores the modular variants: the naive merge and the merge are LoRA files without
training settings, which the report's training table says (not trained) instead of failing."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from pipeline.lora import LoraSpec, add_unet_lora, export_lora, lora_parameters
from pipeline.lora.character_lora import load_character_lora
from pipeline.lora.merge import concat_merge, sum_merge
from pipeline.lora.modular import export_merged
from pipeline.lora.versions import TrainingRun
from pipeline.rendering import GenerationSettings
from pipeline.stages.evaluation import (
    VARIANTS,
    EvaluationReport,
    EvaluationScoring,
    Subject,
    image_reward_note,
    modular_variants,
    run_evaluation,
)
from pipeline.storage.lineage import LineageRecorder
from tests.pipeline.quality.conftest import PHRASES, SIDE, layout_for


@pytest.fixture(scope="module")
def evaluated(quality, tmp_path_factory):
    root = tmp_path_factory.mktemp("modular_evaluation")
    pipe = quality.factory()
    loras = []
    for seed, phrase in enumerate(PHRASES, start=1):
        unet = UNet2DConditionModel.from_pretrained(quality.root / "sdxl", subfolder="unet")
        add_unet_lora(unet, LoraSpec(rank=2, alpha=2.0))
        generator = torch.Generator().manual_seed(seed)
        for param in lora_parameters(unet):
            param.data = torch.randn(param.shape, generator=generator) * 0.05
        files = export_lora(root / phrase.split()[0], unet, LoraSpec(rank=2, alpha=2.0))
        loras.append(load_character_lora(pipe, files["diffusers"]))
    recorder = LineageRecorder(root / "lineage", "run", "lora", "olis__vrin", "test")
    run = TrainingRun(root / "lora", root / "cache", recorder, "tiny-sdxl")
    modular = {
        "naive_merge": export_merged(pipe, concat_merge(loras), root / "naive", run, "naive-x"),
        "merged": export_merged(pipe, sum_merge(loras), root / "merged", run, "merged-x"),
    }
    pair_lora = quality.base.as_current()
    variants, notes = modular_variants(VARIANTS, modular, pair_lora, "sum")
    scoring = EvaluationScoring(quality.scorer, quality.scorer.unavailable, None, "no CLIP configured",
                                image_reward_note(""))  # fmt: skip
    return run_evaluation(
        pipe_factory=quality.factory, variants=variants, scoring=scoring, layout_factory=layout_for,
        generation=GenerationSettings(("olis dog and vrin dog in a park",), SIDE, 1, 5.0, None), seeds=[3],
        subjects=[Subject("olis", "dog", "olis dog"), Subject("vrin", "dog", "vrin dog")], out_dir=root / "out",
        recorder=recorder, base_model_id="tiny-sdxl", report=EvaluationReport(segmix_lora=pair_lora, notes=notes),
        log=lambda _: None,
    )  # fmt: skip


def test_the_modular_variants_are_rendered_scored_and_reported(evaluated):
    assert set(evaluated.metrics["variant"]) == {"naive_merge", "merged", "merged_segmix"}
    training = evaluated.training.set_index("variant")
    assert training.loc["merged", "lora"] == "merged-x"
    # A merge has no training: the table says so rather than calling the record old or unknown.
    assert training.loc["merged", "differs_from_segmix"] == training.loc["naive_merge", "differs_from_segmix"]
    assert training.loc["merged", "differs_from_segmix"] == "not trained: the character LoRA files merged"
    assert training.loc["merged_segmix", "differs_from_segmix"] == "nothing"
    assert "naive_merge" in evaluated.report and "the character LoRAs merged (sum)" in evaluated.report
