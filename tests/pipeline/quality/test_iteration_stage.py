"""The iteration stage on tiny models: rounds, training with KL from the previous LoRA, resume, continue, pause."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import CastloraError
from pipeline.iteration_rules import STOP_MAX_ROUNDS, STOP_PROMPT_DISTANCE, IterationConfig
from pipeline.lora.record import LoraRecord
from pipeline.lora.versions import TrainingRun
from pipeline.rendering import GenerationSettings
from pipeline.stages.iteration import (
    PROMPT_DISTANCES_FILE,
    STOP_PAUSED,
    current_iteration,
    round_grid,
    round_training,
    run_iteration,
)
from pipeline.storage.lineage import LineageRecorder, read_lineage
from pipeline.train import TrainConfig
from tests.pipeline.quality.conftest import SIDE, layout_for

GENERATION = GenerationSettings(("olis dog and vrin dog in a park",), SIDE, 2, 5.0, "sticker, collage")
# Never converge or stall by the numbers, so the round budget alone decides where the loop stops.
LOOP = dict(images_per_round=2, keep_top=2, train_steps=2, max_rounds=5, kl_weight=1.0, distance_fraction=0.01,
            min_improvement=-10)  # fmt: skip


def run(quality, root: Path, **overrides):
    config = IterationConfig(**{**LOOP, **overrides.pop("loop", {})})
    recorder = LineageRecorder(root / "lineage", "run", "iteration", "olis__vrin", "test")
    out = run_iteration(
        pipe_factory=quality.factory, base_lora=quality.base.as_current(), scorer=quality.scorer,
        layout_factory=layout_for, generation=GENERATION, config=config, train_config=quality.train_config,
        run=TrainingRun(root / "iteration", quality.root / "cache", recorder, "tiny-sdxl"),
        log=lambda _: None, **overrides,
    )  # fmt: skip
    recorder.flush()
    return out


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def two_rounds(quality, tmp_path_factory):
    root = tmp_path_factory.mktemp("iteration")
    return root, run(quality, root, loop={"max_rounds": 2})


def test_rounds_are_scored_kept_and_trained(quality, two_rounds):
    root, out = two_rounds
    assert out.stop_reason == STOP_MAX_ROUNDS
    assert out.rounds["round"].tolist() == [0, 1]
    assert out.rounds["n_generated"].tolist() == [2, 2] and out.rounds["n_kept"].tolist() == [2, 2]
    first = json.loads((out.run_dir / "round_00" / "summary.json").read_text())
    trained = first["trained_lora"]
    assert Path(trained["diffusers"]).is_file() and Path(trained["kohya"]).is_file()
    # The next model was trained with the KL term from round 0's model (the base LoRA) on the kept images.
    assert trained["train_config"]["kl_weight"] == 1.0 and trained["train_config"]["segmix_p"] == 0.0
    assert trained["sha256"]["diffusers"] != quality.base.sha256s["diffusers"]
    ranking = pd.read_parquet(out.run_dir / "round_00" / "ranking.parquet")
    assert set(ranking.columns) >= {"image_path", "score", "reason", "prompt", "seed", "sha256"}
    dnc = pd.read_parquet(out.run_dir / "round_00" / "dnc.parquet")
    assert set(dnc["mode"]) == {"default", "mudi"} and set(dnc["embedder"]) == {"dinov2"}
    # Round 1 rendered with the trained model, not the base LoRA.
    samples = pd.read_parquet(out.run_dir / "round_01" / "samples" / "manifest.parquet")
    assert set(samples["lora_version"]) == {trained["version"]}
    current = current_iteration(root / "iteration")
    assert current.picked.round == out.best_round and current.diffusers == out.best_lora.diffusers


def test_rounds_use_fresh_seeds_and_lineage_links_kept_sets(two_rounds):
    root, out = two_rounds
    seeds = [set(pd.read_parquet(out.run_dir / f"round_{k:02d}" / "ranking.parquet")["seed"]) for k in (0, 1)]
    assert not seeds[0] & seeds[1]
    lineage = read_lineage(root / "lineage").to_pandas()
    kept_rows = lineage[lineage["artifact_uri"].str.endswith("kept.parquet")]
    kept = pd.read_parquet(out.run_dir / "round_00" / "kept.parquet")
    assert len(kept_rows) == 2 and set(kept["sha256"]) <= set(kept_rows.iloc[0]["parent_sha256s"])


def test_rerun_reuses_every_round_and_more_rounds_continue(quality, two_rounds):
    root, out = two_rounds
    before = mtimes(out.run_dir)
    loads = quality.factory.calls
    again = run(quality, root, loop={"max_rounds": 2})
    assert quality.factory.calls == loads, "a finished loop must not load a model again"
    assert mtimes(out.run_dir) == before and again.run_dir == out.run_dir
    more = run(quality, root, loop={"max_rounds": 3})
    assert more.run_dir == out.run_dir and more.rounds["round"].tolist() == [0, 1, 2]
    assert {k: v for k, v in mtimes(out.run_dir).items() if k in before} == before, "old rounds were re-rendered"
    assert json.loads((out.run_dir / "round_01" / "summary.json").read_text())["trained_lora"] is not None


def test_one_round_per_run_pauses_and_the_next_run_continues(quality, tmp_path):
    first = run(quality, tmp_path, loop={"max_rounds": 2}, rounds_per_run=1)
    assert first.stop_reason == STOP_PAUSED and len(first.history) == 1
    second = run(quality, tmp_path, loop={"max_rounds": 2}, rounds_per_run=1)
    assert second.stop_reason == STOP_MAX_ROUNDS and second.rounds["round"].tolist() == [0, 1]


def test_round_grid_renders_exactly_the_images_asked_for():
    prompts = [f"p{i}" for i in range(8)]
    assert round_grid(prompts, 200) == (prompts, [25] * 8)
    assert round_grid(prompts, 4) == (prompts[:4], [1] * 4)
    assert round_grid(prompts[:3], 200) == (prompts[:3], [67, 67, 66])  # 201 before: ceil(200 / 3) each
    for n_prompts, images in [(3, 200), (8, 10), (5, 7), (1, 3), (7, 7)]:
        used, counts = round_grid(prompts[:n_prompts], images)
        assert sum(counts) == images and len(used) == len(counts) and max(counts) - min(counts) <= 1


def test_preference_step_trains_dpo_on_best_and_worst_of_a_prompt(quality, tmp_path):
    out = run(quality, tmp_path, loop={"max_rounds": 2, "preference": True, "dpo_steps": 2, "preference_margin": 0.0})
    trained = json.loads((out.run_dir / "round_00" / "summary.json").read_text())["trained_lora"]
    # The round's model is the DPO result, itself started from the KL fine-tune.
    assert trained["version"].startswith("dpo-") and Path(trained["diffusers"]).is_file()
    assert "round_00/dpo" in trained["diffusers"]
    assert trained["train_config"]["dpo_beta"] == 5000.0
    samples = pd.read_parquet(out.run_dir / "round_01" / "samples" / "manifest.parquet")
    assert set(samples["lora_version"]) == {trained["version"]}


def test_each_round_inherits_the_base_settings_except_what_the_iteration_sets():
    base = TrainConfig(steps=800, resolution=1024, mixed_precision="no", rank=8, alpha=8.0, segmix_p=0.3,
                       prior_weight=1.0, dco_beta=1000.0, gradient_checkpointing=True, lr=2e-4, seed=3)  # fmt: skip
    config = IterationConfig(images_per_round=4, keep_top=2, train_steps=7, kl_weight=0.5, preference=True,
                             dpo_steps=3, dpo_beta=2500.0)  # fmt: skip
    training = round_training(base, config)
    assert base.differences(training.fine_tune) == {
        "steps": (800, 7), "segmix_p": (0.3, 0.0), "prior_weight": (1.0, 0.0), "dco_beta": (1000.0, 0.0),
        "kl_weight": (0.0, 0.5),
    }  # fmt: skip
    assert base.differences(training.preference) == {
        "steps": (800, 3), "segmix_p": (0.3, 0.0), "prior_weight": (1.0, 0.0), "dco_beta": (1000.0, 0.0),
        "dpo_beta": (0.0, 2500.0),
    }  # fmt: skip
    assert round_training(base, dataclasses.replace(config, preference=False)).preference is None


def test_an_impossible_preference_step_fails_before_any_rendering_or_training(tmp_path):
    def no_model():
        raise AssertionError("the loop loaded a model before refusing its configuration")

    base = TrainConfig(steps=2, rank=4, alpha=4.0, resolution=SIDE, mixed_precision="no", train_text_encoder=True)
    config = IterationConfig(**{**LOOP, "preference": True})
    with pytest.raises(CastloraError, match=r"preference=True.*train_text_encoder=True.*set preference to false"):
        run_iteration(
            pipe_factory=no_model, base_lora=LoraRecord("lora-x", {}, {}), scorer=None, layout_factory=layout_for,
            generation=GENERATION, config=config, train_config=base,
            run=TrainingRun(tmp_path, tmp_path / "cache", None, "tiny-sdxl"),
        )  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_per_prompt_rule_renders_exactly_n_and_records_which_rule_stopped(quality, tmp_path):
    prompts = ("olis dog and vrin dog in a park", "olis dog and vrin dog on a beach")
    generation = dataclasses.replace(GENERATION, prompts=prompts)
    # 3 images over 2 prompts: 2 + 1 (ceil would render 4). A huge d_conv: converged at round 0, no training.
    config = IterationConfig(**{**LOOP, "images_per_round": 3, "convergence": "per_prompt", "d_conv": 10.0})
    recorder = LineageRecorder(tmp_path / "lineage", "run", "iteration", "olis__vrin", "test")
    out = run_iteration(
        pipe_factory=quality.factory, base_lora=quality.base.as_current(), scorer=quality.scorer,
        layout_factory=layout_for, generation=generation, config=config, train_config=quality.train_config,
        run=TrainingRun(tmp_path / "iteration", quality.root / "cache", recorder, "tiny-sdxl"),
        log=lambda _: None,
    )  # fmt: skip
    assert out.stop_reason == STOP_PROMPT_DISTANCE and out.rounds["converged"].tolist() == [True]
    samples = pd.read_parquet(out.run_dir / "round_00" / "samples" / "manifest.parquet")
    assert len(samples) == 3 and samples["prompt"].value_counts().to_dict() == {prompts[0]: 2, prompts[1]: 1}
    distances = json.loads((out.run_dir / "round_00" / PROMPT_DISTANCES_FILE).read_text())
    assert distances[prompts[1]] is None and 0 <= distances[prompts[0]] == pytest.approx(
        out.rounds["prompt_distance"].iloc[0]
    )
    current = current_iteration(tmp_path / "iteration")
    assert current.picked.convergence == "per_prompt" and current.picked.stop_reason == STOP_PROMPT_DISTANCE
    # The rule only decides where the loop stops: switching it continues the same run.
    kept_ratio = IterationConfig(**{**LOOP, "images_per_round": 3, "max_rounds": 1})
    again = run_iteration(
        pipe_factory=quality.factory, base_lora=quality.base.as_current(), scorer=quality.scorer,
        layout_factory=layout_for, generation=generation, config=kept_ratio, train_config=quality.train_config,
        run=TrainingRun(tmp_path / "iteration", quality.root / "cache", recorder, "tiny-sdxl"),
        log=lambda _: None,
    )  # fmt: skip
    assert again.run_dir == out.run_dir and again.stop_reason == STOP_MAX_ROUNDS
