"""End to end through Dagster: register a pair, materialize every asset, check outputs, checks and lineage."""

import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from assets import checks, pair_assets, training_assets
from assets.definitions import build_resources
from assets.jobs import PAIR_ASSETS
from assets.partitions import character_pairs
from pipeline.storage.lineage import ancestors, read_lineage
from pipeline.storage.manifest import is_path_column, read_manifest

RUN_CONFIG = {
    "ops": {
        "references": {"config": {"min_side": 128}},
        "class_images": {"config": {"count": 2, "resolution": 64, "steps": 1}},
        "segmix_bank": {"config": {"n_instance": 6, "n_prior": 0, "canvas_width": 256, "canvas_height": 192}},
        "lora": {
            "config": {"steps": 4, "rank": 4, "alpha": 4.0, "resolution": 64, "checkpoint_every": 2, "log_every": 2}
        },
        "samples": {
            "config": {"prompts": ["zorp ball and quix ball on a beach"], "seeds": [0], "steps": 2, "resolution": 64}
        },
        "iteration": {
            "config": {
                "images_per_round": 2, "keep_top": 2, "train_steps": 2, "max_rounds": 2, "inference_steps": 2,
                "resolution": 64, "prompts": ["zorp ball and quix ball on a beach"],
            }
        },
        "evaluation": {
            "config": {"prompts": ["zorp ball and quix ball on a beach"], "seeds": [7], "inference_steps": 2,
                       "resolution": 64}
        },
    }
}  # fmt: skip
ALL_CHECKS = {
    "segments_found", "every_character_segmented", "enough_references", "masks_not_empty", "bank_not_empty",
    "lora_file_loads", "dnc_not_regressed",
}  # fmt: skip
TRAINED = {
    "references", "segments", "captions", "class_images", "segmix_bank", "lora", "samples", "iteration", "evaluation"
}  # fmt: skip


@pytest.fixture(scope="module")
def materialized(materialize_pair):
    with materialize_pair("e2e", RUN_CONFIG) as run:
        yield run


def test_every_asset_materializes(materialized):
    _, result, materializations, checks = materialized
    assert result.success
    # character_images materializes too (empty for a pair of photos: it writes no lineage rows).
    assert set(materializations) == TRAINED | {"character_images"}
    assert set(checks) == ALL_CHECKS
    assert all(check.passed for check in checks.values()), {k: c.description for k, c in checks.items()}


def test_metadata_shows_images_and_segmenter(materialized):
    _, _, materializations, _ = materialized
    assert materializations["references"].metadata["preview"].value.startswith("![preview](data:image/jpeg;base64,")
    assert "data:image/jpeg;base64" in materializations["segmix_bank"].metadata["instance_samples"].value
    segmenters = materializations["segments"].metadata["segmenters"].value
    assert segmenters == {"grabcut (classical fallback)": 6}


def test_bank_manifest_matches_files(materialized):
    layout, *_ = materialized
    bank = read_manifest(layout.stage_dir("red__blue", "segmix_bank"), "segmix_bank")
    assert len(bank) == 6 and set(bank["kind"]) == {"instance"}
    assert all(sorted(ids) == ["blue", "red"] for ids in bank["character_ids"])
    assert all("zorp ball" in p and "quix ball" in p for p in bank["prompt"])


def test_composite_traces_back_to_reference_photos(materialized):
    layout, *_ = materialized
    lineage = read_lineage(layout.lineage)
    bank = read_manifest(layout.stage_dir("red__blue", "segmix_bank"), "segmix_bank")
    references = read_manifest(layout.stage_dir("red__blue", "references"), "references")
    chain = ancestors(lineage, bank["image_sha256"].iloc[0])
    by_asset = {}
    for row in chain:
        by_asset.setdefault(row["asset_key"], []).append(row)
    assert {"segments", "references"} <= set(by_asset)
    reference_rows = by_asset["references"]
    assert len(reference_rows) == 2  # one photo per character in a 2-subject composite
    sources = {r["source_sha256"] for r in references.to_dict("records")}
    assert all(set(r["parent_sha256s"]) <= sources for r in reference_rows)
    # The raw photos are the roots: no asset wrote them, so they have no lineage row of their own.
    assert {row["artifact_sha256"] for row in by_asset[None]} <= sources


def test_lineage_rows_have_run_and_partition(materialized):
    layout, result, *_ = materialized
    frame = read_lineage(layout.lineage).to_pandas()
    assert set(frame["run_id"]) == {result.run_id}
    assert set(frame["partition_key"]) == {"red__blue"}
    assert set(frame["asset_key"]) == TRAINED
    assert (frame["finished_at"] >= frame["started_at"]).all()
    assert frame["artifact_uri"].str.startswith("pairs/red__blue/").all()  # relative to the data home
    versions = frame.groupby("asset_key")["code_version"].unique().to_dict()
    assert [str(v) for v in versions["segmix_bank"]] == ["castlora-0.1.0/segmix-bank-v1"]


def test_unregistered_partition_fails_with_clear_message(tmp_path):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, ["ghost__pair"])
        result = dg.materialize(
            [pair_assets.references],
            instance=instance,
            partition_key="ghost__pair",
            resources=build_resources({"CASTLORA_HOME": str(tmp_path)}),
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "not registered" in failure.step_failure_data.error.message


def test_lora_files_samples_and_their_lineage(materialized):
    layout, _, materializations, _ = materialized
    meta = materializations["lora"].metadata
    assert meta["steps"].value == 4
    assert "data:image/png;base64" in meta["loss_curve"].value
    assert "data:image/jpeg;base64" in meta["validation_images"].value
    lora_dir = layout.stage_dir("red__blue", "lora") / meta["version"].value
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (lora_dir / "lora_kohya_sgm.safetensors").is_file()
    samples = read_manifest(layout.stage_dir("red__blue", "samples"), "samples")
    assert len(samples) == 1 and samples["lora_version"].iloc[0] == meta["version"].value
    assert samples["gamma"].iloc[0] == 1.0 and samples["layout_source"].iloc[0].startswith("segmix:")
    lineage = read_lineage(layout.lineage)
    chain = {row["asset_key"] for row in ancestors(lineage, samples["sha256"].iloc[0])}
    assert "lora" in chain


def test_rematerializing_lora_resumes_from_its_checkpoints(materialized):
    """A longer run of the same setup continues in the same version folder from the last checkpoint."""
    layout, _, materializations, _ = materialized
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, ["red__blue"])
        config = {"ops": {"lora": {"config": {**RUN_CONFIG["ops"]["lora"]["config"], "steps": 6}}}}
        result = dg.materialize(
            [training_assets.lora],
            instance=instance,
            partition_key="red__blue",
            run_config=config,
            resources=build_resources({"CASTLORA_HOME": str(layout.home)}),
        )
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["version"].value == materializations["lora"].metadata["version"].value
    assert meta["resumed_from_step"].value == 4 and meta["steps"].value == 6


def test_iteration_and_evaluation_report(materialized):
    _, result, materializations, _ = materialized
    assert result.success
    iteration = materializations["iteration"].metadata
    assert iteration["rounds_done"].value == 2
    assert iteration["stop_reason"].value in {"max_rounds", "no_improvement", "distance"}
    assert iteration["detector"].value == "layout (no detector)"  # the tiny preset's labelled fallback
    assert "data:image/jpeg;base64" in iteration["dnc_per_round"].value
    evaluation = materializations["evaluation"].metadata
    report = evaluation["report"].value
    for variant in ("dreambooth", "segmix", "segmix_init", "iterative"):
        assert variant in report and f"grid_{variant}" in evaluation
    assert "image_reward" in report and "no ImageReward weights configured" in report
    metrics = pd.read_parquet(evaluation["metrics_file"].value)
    grids = metrics.groupby("variant")[["prompt", "seed"]].apply(lambda g: sorted(set(map(tuple, g.values))))
    assert len(grids) == 4 and all(grid == [("zorp ball and quix ball on a beach", 7)] for grid in grids)
    assert metrics.loc[metrics["metric"] == "dnc_default:dinov2", "status"].eq("ok").all()
    # The baseline is a declared output: its LoRA inside the evaluation folder, trained like the Seg-Mix LoRA
    # (the run config's 4 steps, not a default) with Seg-Mix off, and the report says so.
    version = evaluation["baseline_version"].value
    baseline_file = Path(evaluation["baseline_lora"].value)
    assert baseline_file.is_file() and baseline_file.parent.name == version
    assert baseline_file.parent.parent.name == "baseline" and baseline_file.parent.parent.parent.name == "evaluation"
    settings = evaluation["baseline_train_config"].data
    assert settings["steps"] == 4 and settings["segmix_p"] == 0.0
    assert "## Training settings" in report and "segmix_p: 0.3 → 0" in report
    assert iteration["convergence_rule"].value == "kept_ratio"


def _run_checks(home, *checks_defs):
    """Run only the given asset checks (not their assets) for red__blue against the materialized home."""
    job = dg.define_asset_job(
        "checks_only", selection=dg.AssetSelection.checks(*checks_defs), partitions_def=character_pairs
    )
    only = dg.Definitions(
        assets=PAIR_ASSETS,
        asset_checks=list(checks_defs),
        jobs=[job],
        resources=build_resources({"CASTLORA_HOME": str(home)}),
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, ["red__blue"])
        # A checks-only job has no asset to carry the partitions definition: the partition goes in as a run tag.
        result = only.resolve_job_def("checks_only").execute_in_process(
            instance=instance, tags={"dagster/partition": "red__blue"}, raise_on_error=False
        )
    return {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}


def test_checks_fail_on_empty_mask_missing_bank_file_and_damaged_lora(materialized):
    """Break one artifact of each kind; each blocking check fails and says what is wrong (files restored after)."""
    layout, _, materializations, _ = materialized
    segments = read_manifest(layout.stage_dir("red__blue", "segments"), "segments")
    mask = Path(segments.loc[segments["status"] == "ok", "mask_path"].iloc[0])
    bank = read_manifest(layout.stage_dir("red__blue", "segmix_bank"), "segmix_bank")
    bank_image = Path(bank["image_path"].iloc[0])
    lora_dir = layout.stage_dir("red__blue", "lora") / materializations["lora"].metadata["version"].value
    kohya = lora_dir / "lora_kohya_sgm.safetensors"
    saved = {path: path.read_bytes() for path in (mask, bank_image, kohya)}
    try:
        Image.new("L", Image.open(mask).size, 0).save(mask)
        bank_image.unlink()
        kohya.write_bytes(saved[kohya][:100])
        results = _run_checks(layout.home, checks.masks_not_empty, checks.bank_not_empty, checks.lora_file_loads)
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    assert not results["masks_not_empty"].passed
    assert "1 usable mask(s) missing or empty" in results["masks_not_empty"].description
    assert not results["bank_not_empty"].passed and str(bank_image) in results["bank_not_empty"].description
    assert not results["lora_file_loads"].passed
    assert "does not match the hash recorded" in results["lora_file_loads"].description
    assert all(results[name].severity == dg.AssetCheckSeverity.ERROR for name in results)
    # Restored: the same checks pass again.
    assert all(r.passed for r in _run_checks(layout.home, checks.masks_not_empty, checks.lora_file_loads).values())


def test_a_moved_data_home_works_on_its_own(materialized, tmp_path):
    """Stored records point inside the pair folder by relative paths: a copy of the data home at another path
    trains, renders and passes its checks while the original is out of the way."""
    layout, _, materializations, _ = materialized
    moved = tmp_path / "elsewhere" / "home"
    shutil.copytree(layout.home, moved, symlinks=True)
    away = layout.home.with_name("home-moved-away")
    layout.home.rename(away)
    try:
        old_home = str(layout.home)
        for record in (moved / "pairs").rglob("*.json"):
            assert old_home not in record.read_text(), record
        for table in (moved / "pairs").rglob("*.parquet"):
            frame = pd.read_parquet(table)
            stored = [str(v) for c in frame.columns if is_path_column(c) for v in frame[c].explode().dropna()]
            assert not any(v.startswith(old_home) for v in stored), table
        segments = pd.read_parquet(moved / "pairs/red__blue/segments/manifest.parquet")
        assert Path(segments["reference_path"].iloc[0]).parts[:2] == ("..", "references")

        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(character_pairs.name, ["red__blue"])
            config = {"ops": {op: RUN_CONFIG["ops"][op] for op in ("lora", "samples")}}
            config["ops"]["lora"] = {"config": {**config["ops"]["lora"]["config"], "steps": 8}}
            result = dg.materialize(
                [training_assets.lora, training_assets.samples],
                instance=instance,
                partition_key="red__blue",
                run_config=config,
                resources=build_resources({"CASTLORA_HOME": str(moved)}),
            )
        lora_meta = result.asset_materializations_for_node("lora")[0].metadata
        assert lora_meta["version"].value == materializations["lora"].metadata["version"].value
        assert lora_meta["resumed_from_step"].value >= 4  # the copied checkpoints were found
        samples = read_manifest(moved / "pairs/red__blue/samples", "samples")
        assert all(Path(p).is_file() and Path(p).is_relative_to(moved) for p in samples["path"])
        results = _run_checks(moved, checks.masks_not_empty, checks.bank_not_empty, checks.lora_file_loads)
        assert all(r.passed for r in results.values()), {k: r.description for k, r in results.items()}
    finally:
        away.rename(layout.home)
