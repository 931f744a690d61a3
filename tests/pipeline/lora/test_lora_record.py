"""The LoRA record (``current.json``) as a dataclass: the same JSON on disk as the dict it replaced, paths relative
inside the pair folder, and a malformed file refused with its path and the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.errors import CastloraError
from pipeline.lora.record import CURRENT_FILE, IterationPick, LoraRecord, read_current, write_current
from pipeline.storage.paths import PAIR_SPEC_FILE
from pipeline.train import TrainConfig

SETTINGS = TrainConfig(steps=7, rank=4, alpha=4.0).as_record()


def lora_dict(folder: Path) -> dict:
    """A record as castlora wrote it when it was a dict (``LoraOutput.as_current``), keys in that order."""
    return {
        "version": "lora-abc",
        "steps": 7,
        "diffusers": str(folder / "lora-abc" / "pytorch_lora_weights.safetensors"),
        "kohya": str(folder / "lora-abc" / "lora_kohya_sgm.safetensors"),
        "sha256": {"diffusers": "0" * 64, "kohya": "1" * 64},
        "train_config": SETTINGS,
    }


@pytest.fixture
def lora_root(tmp_path: Path) -> Path:
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / PAIR_SPEC_FILE).write_text("{}")  # a registered pair folder: paths inside are relative
    root = tmp_path / "pair" / "lora"
    root.mkdir()
    return root


def test_a_record_written_as_a_dict_reads_back_and_writes_the_same_bytes(lora_root):
    old = lora_dict(lora_root)
    stored = {
        **old,
        "diffusers": "lora-abc/pytorch_lora_weights.safetensors",
        "kohya": "lora-abc/lora_kohya_sgm.safetensors",
    }
    (lora_root / CURRENT_FILE).write_text(json.dumps(stored, indent=2) + "\n")  # what the dict version wrote
    before = (lora_root / CURRENT_FILE).read_bytes()

    record = read_current(lora_root, "lora")
    assert (
        record.version == "lora-abc"
        and record.steps == 7
        and record.train_config() == TrainConfig.from_record(SETTINGS, "x")
    )
    assert record.diffusers == Path(old["diffusers"]) and record.files["kohya"] == Path(old["kohya"])
    assert record.diffusers_sha256 == "0" * 64 and record.picked is None
    assert record.to_json() == old
    write_current(record, lora_root)
    assert (lora_root / CURRENT_FILE).read_bytes() == before


def test_the_iterations_pick_travels_flat_after_the_lora_fields(lora_root):
    record = LoraRecord.from_json(lora_dict(lora_root), lora_root, "test")
    pick = IterationPick(round=1, run="iter-123", stop_reason=None, convergence="kept_ratio", base_lora="lora-000")
    picked = dataclasses.replace(record, picked=pick)
    data = picked.to_json()
    assert list(data) == [*lora_dict(lora_root), "round", "run", "stop_reason", "convergence", "base_lora"]
    assert LoraRecord.from_json(json.loads(json.dumps(data)), lora_root, "test") == picked


def test_an_old_record_without_steps_or_settings_loads_and_says_what_it_lacks(lora_root):
    old = {k: v for k, v in lora_dict(lora_root).items() if k not in ("steps", "train_config")}
    record = LoraRecord.from_json(old, lora_root, "test")
    assert record.steps is None and record.to_json() == old
    with pytest.raises(CastloraError, match="LoRA lora-abc records no training settings"):
        record.train_config()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": None}, "'version'"),
        ({"kohya": None}, "'kohya'"),
        ({"sha256": {"diffusers": "0" * 64}}, "'sha256.kohya'"),
        ({"sha256": "0" * 64}, "'sha256'"),
        ({"steps": "7"}, "'steps'"),
        ({"train_config": [1]}, "'train_config'"),
        ({"round": 1, "run": "iter-1"}, "'convergence'"),
    ],
)
def test_a_malformed_record_is_refused_naming_the_file_and_the_field(lora_root, change, field):
    (lora_root / CURRENT_FILE).write_text(json.dumps({**lora_dict(lora_root), **change}))
    with pytest.raises(CastloraError, match=rf"{CURRENT_FILE} is not a valid LoRA record: field {field}"):
        read_current(lora_root, "lora")


def test_a_missing_or_unreadable_file_names_the_asset_to_materialize(lora_root):
    with pytest.raises(CastloraError, match=r"current\.json does not exist: materialize the 'lora' asset"):
        read_current(lora_root, "lora")
    (lora_root / CURRENT_FILE).write_text("{not json")
    with pytest.raises(CastloraError, match=r"current\.json is not valid JSON"):
        read_current(lora_root, "lora")
    (lora_root / CURRENT_FILE).write_text("[]")
    with pytest.raises(CastloraError, match=r"current\.json is not a valid LoRA record: expected a JSON object"):
        read_current(lora_root, "lora")
