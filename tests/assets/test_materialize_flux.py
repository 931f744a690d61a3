"""End to end through Dagster on the ``tiny-flux`` preset: every pair asset materializes for FLUX.1 through the
same stages as SDXL (docs/design.md#flux1)."""

import pandas as pd
import pytest

from pipeline.storage.lineage import ancestors, read_lineage
from pipeline.storage.manifest import read_manifest

PROMPT = "zorp ball and quix ball on a beach"
RUN_CONFIG = {
    "ops": {
        "references": {"config": {"min_side": 128}},
        "class_images": {"config": {"count": 1, "resolution": 64, "steps": 1}},
        "segmix_bank": {"config": {"n_instance": 4, "n_prior": 0, "canvas_width": 128, "canvas_height": 96}},
        "lora": {"config": {"steps": 2, "rank": 4, "alpha": 4.0, "resolution": 64, "checkpoint_every": 2,
                            "log_every": 1}},
        "samples": {"config": {"prompts": [PROMPT], "seeds": [0], "steps": 2, "resolution": 64}},
        "iteration": {
            "config": {"images_per_round": 2, "keep_top": 2, "train_steps": 1, "max_rounds": 2, "inference_steps": 2,
                       "resolution": 64, "prompts": [PROMPT]}
        },
        "evaluation": {"config": {"prompts": [PROMPT], "seeds": [7], "inference_steps": 2, "resolution": 64}},
    }
}  # fmt: skip
TRAINED = {
    "references", "segments", "captions", "class_images", "segmix_bank", "lora", "samples", "iteration", "evaluation"
}  # fmt: skip


@pytest.fixture(scope="module")
def materialized(materialize_pair):
    with materialize_pair("e2e-flux", RUN_CONFIG, {"CASTLORA_PRESET": "tiny-flux"}) as run:
        yield run


def test_every_asset_materializes_on_flux(materialized):
    _, result, materializations, checks = materialized
    failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
    assert result.success, failures
    assert set(materializations) == TRAINED | {"character_images"}  # nothing to render for a pair of photos
    assert all(check.passed for check in checks.values()), {k: c.description for k, c in checks.items()}
    assert checks["lora_file_loads"].passed


def test_flux_lora_files_and_samples(materialized):
    layout, _, materializations, _ = materialized
    meta = materializations["lora"].metadata
    lora_dir = layout.stage_dir("red__blue", "lora") / meta["version"].value
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (lora_dir / "lora_kohya_flux.safetensors").is_file()
    samples = read_manifest(layout.stage_dir("red__blue", "samples"), "samples")
    assert len(samples) == 1 and samples["lora_version"].iloc[0] == meta["version"].value
    lineage = read_lineage(layout.lineage)
    assert "lora" in {row["asset_key"] for row in ancestors(lineage, samples["sha256"].iloc[0])}
    frame = read_lineage(layout.lineage).to_pandas()
    assert set(frame["asset_key"]) == TRAINED


def test_flux_iteration_and_evaluation_report(materialized):
    _, _, materializations, _ = materialized
    assert materializations["iteration"].metadata["rounds_done"].value == 2  # round 1 fine-tunes model 0
    evaluation = materializations["evaluation"].metadata
    report = evaluation["report"].value
    for variant in ("dreambooth", "segmix", "segmix_init", "iterative"):
        assert variant in report and f"grid_{variant}" in evaluation
    assert "| variant | family | base_model |" in report  # the training table, per variant
    training = evaluation["training_settings"].value
    assert training.count("| flux | tiny:flux |") == 4
    metrics = pd.read_parquet(evaluation["metrics_file"].value)
    assert metrics["variant"].nunique() == 4
