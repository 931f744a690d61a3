"""The launchpad configs repeat fields of the pipeline's config dataclasses (Dagster needs its own pydantic
classes): a shared field must keep the pipeline's default, except the ones the launchpad resolves from the model
preset (0 or "auto" there). This catches a default changed on one side only."""

import dataclasses

import pytest

from assets.pair_assets import ClassImagesConfig, ReferencesConfig, SegmentsConfig, SegMixBankConfig
from assets.quality_assets import IterationAssetConfig
from assets.training_assets import LoraTrainingConfig
from pipeline.images import IntakeConfig
from pipeline.iteration_rules import IterationConfig
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import SegmentConfig
from pipeline.segmix.compose import SegMixConfig
from pipeline.stages.segmix_bank import BankConfig
from pipeline.train import TrainConfig

PRESET_RESOLVED = {"auto", 0}

MIRRORS = [
    (LoraTrainingConfig, TrainConfig, {"steps", "resolution", "mixed_precision"}),
    (ReferencesConfig, IntakeConfig, set()),
    (SegmentsConfig, SegmentConfig, set()),
    (SegMixBankConfig, BankConfig, set()),
    (SegMixBankConfig, SegMixConfig, set()),
    (ClassImagesConfig, ClassImageConfig, {"count", "resolution", "steps"}),
    (IterationAssetConfig, IterationConfig, {"images_per_round", "keep_top", "train_steps", "max_rounds"}),
]


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _same(launchpad_value, pipeline_value) -> bool:
    """Equal defaults; an empty launchpad list/dict stands for the pipeline's None (YAML has no None-able dict)."""
    if launchpad_value in ({}, []) and pipeline_value is None:
        return True
    return launchpad_value == pipeline_value


@pytest.mark.parametrize(
    ("launchpad", "pipeline_config", "from_preset"), MIRRORS, ids=lambda v: getattr(v, "__name__", "")
)
def test_shared_fields_keep_the_pipeline_default(launchpad, pipeline_config, from_preset):
    ours = {name: info.get_default(call_default_factory=True) for name, info in launchpad.model_fields.items()}
    theirs = {f.name: _default(f) for f in dataclasses.fields(pipeline_config)}
    shared = sorted(set(ours) & set(theirs))
    assert shared, f"{launchpad.__name__} shares no field with {pipeline_config.__name__}"
    drifted = {
        name: (ours[name], theirs[name])
        for name in shared
        if (ours[name] not in PRESET_RESOLVED if name in from_preset else not _same(ours[name], theirs[name]))
    }
    assert not drifted, f"{launchpad.__name__} vs {pipeline_config.__name__}: (launchpad, pipeline) defaults {drifted}"
