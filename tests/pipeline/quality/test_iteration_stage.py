"""The iteration stage on tiny models: rounds, training with KL from the previous LoRA, resume, continue, pause."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.iteration import STOP_MAX_ROUNDS, IterationConfig
from pipeline.lineage import LineageRecorder, read_lineage
from pipeline.stages.iteration import STOP_PAUSED, GenerationSettings, current_iteration, round_grid, run_iteration
from tests.pipeline.quality.conftest import SIDE, layout_for

GENERATION = GenerationSettings(("olis dog and vrin dog in a park",), SIDE, 2, 5.0, "sticker, collage")
# Never converge or stall by the numbers, so the round budget alone decides where the loop stops.
LOOP = dict(images_per_round=2, keep_top=2, train_steps=2, kl_weight=1.0, distance_fraction=0.01, min_improvement=-10)


def run(quality, root: Path, **overrides):
    config = IterationConfig(**{**LOOP, **overrides.pop("loop", {})})
    recorder = LineageRecorder(root / "lineage", "run", "iteration", "olis__vrin", "test")
    out = run_iteration(
        quality.factory, quality.base.as_current(), quality.scorer, layout_for, GENERATION, config,
        quality.train_config, root / "iteration", quality.root / "cache", recorder, "tiny-sdxl", log=lambda _: None,
        **overrides,
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
    assert current["round"] == out.best_round and current["diffusers"] == out.best_lora["diffusers"]


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


def test_round_grid_spreads_images_over_prompts():
    prompts = [f"p{i}" for i in range(8)]
    assert round_grid(prompts, 200) == (prompts, 25)
    assert round_grid(prompts, 4) == (prompts[:4], 1)
    used, per_prompt = round_grid(prompts, 10)
    assert per_prompt == 2 and len(used) * per_prompt >= 10 and (len(used) - 1) * per_prompt < 10


def test_preference_step_trains_dpo_on_best_and_worst_of_a_prompt(quality, tmp_path):
    out = run(quality, tmp_path, loop={"max_rounds": 2, "preference": True, "dpo_steps": 2, "preference_margin": 0.0})
    trained = json.loads((out.run_dir / "round_00" / "summary.json").read_text())["trained_lora"]
    # The round's model is the DPO result, itself started from the KL fine-tune.
    assert trained["version"].startswith("dpo-") and Path(trained["diffusers"]).is_file()
    assert "round_00/dpo" in trained["diffusers"]
    assert trained["train_config"]["dpo_beta"] == 5000.0
    samples = pd.read_parquet(out.run_dir / "round_01" / "samples" / "manifest.parquet")
    assert set(samples["lora_version"]) == {trained["version"]}
