"""End to end through Dagster for a pair made only of two character LoRA files (modular customization): every
asset materializes; the generated character images trace back to the LoRA files; the pair's LoRA is the merge
fine-tuned with KL; the evaluation shows naive_merge, merged and merged_segmix."""

import json
from pathlib import Path

import pytest

from pipeline.lora.example_pair import write_example_lora_pair
from pipeline.lora.modular import read_modular
from pipeline.lora.record import read_current
from pipeline.models.tiny_sdxl import build_tiny_sdxl
from pipeline.storage.hashing import sha256_file
from pipeline.storage.lineage import read_lineage
from pipeline.storage.manifest import read_manifest

KEY = "zorp__quix"
IMAGES = 3
PROMPT = "zorp ball and quix ball on a beach"
RUN_CONFIG = {
    "ops": {
        "character_images": {"config": {"images_per_character": IMAGES, "steps": 1, "resolution": 64}},
        "references": {"config": {"min_side": 64}},
        "class_images": {"config": {"count": 2, "resolution": 64, "steps": 1}},
        "segmix_bank": {"config": {"n_instance": 4, "n_prior": 0, "canvas_width": 64, "canvas_height": 64}},
        "lora": {
            "config": {"steps": 4, "rank": 4, "alpha": 4.0, "resolution": 64, "checkpoint_every": 2, "log_every": 1,
                       "merge_method": "gradient_fusion", "fusion_timesteps": 1, "finetune_steps": 2}
        },
        "samples": {"config": {"prompts": [PROMPT], "seeds": [0], "steps": 1, "resolution": 64}},
        "iteration": {
            "config": {"images_per_round": 2, "keep_top": 2, "train_steps": 1, "max_rounds": 1, "inference_steps": 1,
                       "resolution": 64, "prompts": [PROMPT]}
        },
        "evaluation": {
            "config": {"prompts": [PROMPT], "seeds": [7], "inference_steps": 1, "resolution": 64,
                       "variants": ["segmix", "naive_merge", "merged", "merged_segmix"]}
        },
    }
}  # fmt: skip


def _lora_pair(root: Path) -> Path:
    """The example pair a user gets from ``castlora example-lora-pair``: two random character LoRAs for the tiny
    SDXL (one diffusers, one kohya file) and user masks named like the images ``character_images`` renders (so no
    segmenter judges random renders)."""
    tiny = root / "tiny"
    build_tiny_sdxl(tiny)
    folder = root / "src"
    write_example_lora_pair(folder, tiny, images_per_character=IMAGES)
    return folder


@pytest.fixture(scope="module")
def materialized(materialize_pair):
    with materialize_pair("modular_e2e", RUN_CONFIG, pair=_lora_pair) as (layout, result, materializations, _):
        yield layout, layout.home.parent / "src", result, materializations


def test_a_pair_of_two_lora_files_materializes_end_to_end(materialized):
    layout, folder, result, materializations = materialized
    failures = [e.message for e in result.all_events if e.is_failure]
    assert result.success, failures
    assert set(materializations) >= {"character_images", "references", "lora", "evaluation"}
    generated = read_manifest(layout.stage_dir(KEY, "character_images"), "character_images")
    assert generated.groupby("character_id").size().to_dict() == {"zorp": IMAGES, "quix": IMAGES}
    # Each reference traces back (references -> character_images) to its character's LoRA file. The rows are
    # followed by hand: a 64 px render taken in unchanged has the same bytes (and sha256) as its reference copy.
    references = read_manifest(layout.stage_dir(KEY, "references"), "references")
    assert set(references["origin"]) == {"generated"}
    rows = read_lineage(layout.lineage).to_pylist()
    images = {r["artifact_sha256"]: r for r in rows if r["asset_key"] == "character_images"}
    lora_sha = {cid: sha256_file(folder / f"{cid}.safetensors") for cid in ("zorp", "quix")}
    reference_rows = [r for r in rows if r["asset_key"] == "references"]
    assert len(reference_rows) == 2 * IMAGES
    for row in reference_rows:
        character = json.loads(row["params_json"])["character_id"]
        (image_sha,) = row["parent_sha256s"]
        assert images[image_sha]["parent_sha256s"] == [lora_sha[character]]
    # The pair's LoRA is the merge fine-tuned with KL; the merge records are next to it.
    lora_root = layout.stage_dir(KEY, "lora")
    current = read_current(lora_root, "lora")
    assert current.train_config().kl_weight == 1.0 and current.steps == 2
    assert materializations["lora"].metadata["merge_method"].value == "gradient_fusion"
    modular = read_modular(lora_root)
    assert modular is not None and modular["merged"].diffusers.is_file()
    metrics = read_manifest(layout.stage_dir(KEY, "evaluation"), "evaluation", "metrics.parquet")
    assert {"naive_merge", "merged", "merged_segmix"} <= set(metrics["variant"])
