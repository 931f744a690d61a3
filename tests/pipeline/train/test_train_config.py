"""A LoRA's record keeps every training setting, and the config is rebuilt from it exactly (no defaults)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.errors import CastloraError
from pipeline.lora.record import LoraRecord
from pipeline.lora.versions import LoraOutput
from pipeline.stages.evaluation import dreambooth_config
from pipeline.train import TrainConfig
from pipeline.train.loop import TrainResult

# Constant schedule, a step count other than the dataclass default, memory settings on: what today's sdxl preset
# trains with and what a lossy record used to lose.
SEGMIX = TrainConfig(steps=800, lr_scheduler="constant", gradient_checkpointing=True, compile_unet=True, seed=7)


def record_of(config: TrainConfig) -> dict:
    result = TrainResult(steps_done=config.steps, final_loss=0.1, losses=[], lora_state={}, resumed_from=None)
    files = {"diffusers": Path("/x/a.safetensors"), "kohya": Path("/x/k.safetensors")}
    output = LoraOutput("lora-abc", Path("/x"), files, {"diffusers": "0" * 64, "kohya": "1" * 64}, result, config)
    return json.loads(json.dumps(output.as_current().to_json()))  # as written to current.json


def train_config_of(record: dict) -> TrainConfig:
    return LoraRecord.from_json(record, Path("/x"), "current.json").train_config()


def test_every_field_is_recorded_and_rebuilt_exactly():
    record = record_of(SEGMIX)
    assert set(record["train_config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert train_config_of(record) == SEGMIX


def test_dreambooth_baseline_differs_from_the_segmix_lora_in_segmix_p_alone():
    baseline = dreambooth_config(train_config_of(record_of(SEGMIX)))
    assert baseline.steps == 800 and baseline.gradient_checkpointing and baseline.compile_unet
    assert SEGMIX.differences(baseline) == {"segmix_p": (0.3, 0.0)}


def test_a_record_that_lacks_or_adds_a_field_is_refused_by_name():
    record = record_of(SEGMIX)
    del record["train_config"]["steps"]
    with pytest.raises(CastloraError, match=r"LoRA lora-abc.*missing \['steps'\].*re-materialize"):
        train_config_of(record)
    record = record_of(SEGMIX)
    record["train_config"]["warp_drive"] = True
    with pytest.raises(CastloraError, match=r"unknown \['warp_drive'\]"):
        train_config_of(record)
    with pytest.raises(CastloraError, match="records no training settings"):
        LoraRecord("lora-old", {}, {}).train_config()


def test_unset_fields_are_filled_in_one_place_and_an_unresolved_config_never_trains():
    from pipeline.models.presets import PRESETS
    from pipeline.train.config import resolve_train_config

    unset = TrainConfig(rank=8)
    assert (unset.steps, unset.resolution, unset.mixed_precision) == (None, None, None)
    with pytest.raises(CastloraError, match=r"\['steps', 'resolution', 'mixed_precision'\] are not set"):
        unset.result_fields()
    tiny = resolve_train_config(unset, PRESETS["tiny"], "float32")
    assert (tiny.steps, tiny.resolution, tiny.mixed_precision, tiny.rank) == (30, 256, "no", 8)
    on_gpu = resolve_train_config(unset, PRESETS["sdxl"], "bfloat16")
    assert (on_gpu.steps, on_gpu.resolution, on_gpu.mixed_precision) == (800, 1024, "bf16")
    chosen = TrainConfig(steps=5, resolution=64, mixed_precision="no")
    assert resolve_train_config(chosen, PRESETS["sdxl"], "float16") == chosen


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("resolution", 0), ("mixed_precision", "auto")])
def test_the_old_launchpad_sentinels_are_refused_naming_the_field(field, value):
    with pytest.raises(CastloraError, match=rf"{field}={value!r}.*leave it unset" if isinstance(value, str) else
                       rf"{field}={value} must be .*leave it unset"):  # fmt: skip
        TrainConfig(**{field: value})
