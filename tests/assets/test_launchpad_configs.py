"""The launchpad configs are derived from the settings dataclasses (assets/launchpad.py): same fields, same
defaults, the fields' docstrings as descriptions, and "not set" (None) resolved against the model preset in one
place. The resolved settings of an untouched launchpad equal what castlora used before the settings were declared
once."""

import dataclasses
import re
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.launchpad import (
    LAUNCHPAD_CONFIGS,
    ClassImagesConfig,
    EvaluationAssetConfig,
    IterationAssetConfig,
    IterationRun,
    LoraTrainingConfig,
    QualityRenderSettings,
    SamplesConfig,
    SamplesSettings,
    SegMixBankConfig,
    launchpad_config,
    launchpad_fields,
)
from pipeline.errors import CastloraError
from pipeline.iteration_rules import IterationConfig
from pipeline.models.presets import PRESETS
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import SegmentConfig
from pipeline.settings import field_docs, from_preset, internal, preset_attribute, resolve
from pipeline.train import TrainConfig
from pipeline.train.config import resolve_train_config

REPO = Path(__file__).resolve().parents[2]


def _dataclass_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@pytest.mark.parametrize("config", LAUNCHPAD_CONFIGS, ids=lambda c: c.__name__)
def test_launchpad_fields_are_exactly_the_user_fields_of_its_dataclasses(config):
    expected = [f.name for cls in config.sources for f in launchpad_fields(cls)]
    assert list(config.model_fields) == expected
    for cls in config.sources:
        for field in launchpad_fields(cls):
            launchpad_default = config.model_fields[field.name].get_default(call_default_factory=True)
            default = _dataclass_default(field)
            assert launchpad_default == (list(default) if isinstance(default, tuple) else default), field.name


@pytest.mark.parametrize("config", LAUNCHPAD_CONFIGS, ids=lambda c: c.__name__)
def test_every_launchpad_field_is_documented_and_preset_fields_show_the_preset_values(config):
    undocumented = [name for name, info in config.model_fields.items() if not (info.description or "").strip()]
    assert not undocumented, f"{config.__name__}: fields without a docstring: {undocumented}"
    for cls in config.sources:
        for field in launchpad_fields(cls):
            description = config.model_fields[field.name].description
            assert description.startswith(" ".join(field_docs(cls)[field.name].split()))  # one paragraph
            if preset_attribute(field):
                values = [str(getattr(p, preset_attribute(field))) for p in PRESETS.values()]
                assert "preset default" in description and all(v in description for v in values), description


def test_a_new_dataclass_field_appears_in_the_launchpad_without_further_edits():
    @dataclasses.dataclass(frozen=True)
    class Knobs:
        turns: int = 3
        """How many turns."""
        steps: int | None = from_preset("train_steps")
        """Steps; not set: the preset's."""
        secret: float = internal(0.5)
        """Set by another stage."""

    config = launchpad_config("KnobsConfig", Knobs)
    assert list(config.model_fields) == ["turns", "steps"]
    assert config.model_fields["turns"].description == "How many turns."
    assert resolve(config(turns=4).settings(Knobs), PRESETS["sdxl"]) == Knobs(turns=4, steps=800)


def test_internal_fields_stay_out_of_the_launchpad():
    assert {"targets", "kl_weight", "dpo_beta"}.isdisjoint(LoraTrainingConfig.model_fields)
    assert "canvas" not in SegMixBankConfig.model_fields and "segmix" not in SegMixBankConfig.model_fields


def test_no_zero_or_negative_stands_for_a_default_any_more():
    """Every preset-backed field is None until resolved (no ``0`` = "use the preset"), and the asset layer
    resolves through ``pipeline.settings.resolve`` only."""
    for config in LAUNCHPAD_CONFIGS:
        for cls in config.sources:
            for field in launchpad_fields(cls):
                if preset_attribute(field):
                    assert config.model_fields[field.name].default is None, (config.__name__, field.name)
    sentinel = re.compile(r"\bor preset\.|config\.(gamma|rounds_per_run) [<>]=? 0|!= \"auto\"")
    offenders = [
        f"{path.name}:{n}"
        for path in sorted((REPO / "assets").glob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if sentinel.search(line)
    ]
    assert not offenders


@pytest.mark.parametrize(
    ("config", "field", "settings"),
    [
        (LoraTrainingConfig, "steps", TrainConfig),
        (ClassImagesConfig, "count", ClassImageConfig),
        (IterationAssetConfig, "max_rounds", IterationConfig),
        (SamplesConfig, "resolution", SamplesSettings),
        (EvaluationAssetConfig, "inference_steps", QualityRenderSettings),
    ],
)
def test_an_old_zero_for_the_preset_default_is_refused_by_name(config, field, settings):
    with pytest.raises(CastloraError, match=rf"{field}=0: leave {field} unset \(null\) for the model preset's"):
        config(**{field: 0}).settings(settings)


def test_old_negative_gamma_and_zero_rounds_per_run_are_refused_with_the_new_spelling():
    with pytest.raises(CastloraError, match="negative gamma no longer means plain noise; set gamma to null"):
        SamplesConfig(gamma=-1.0).settings(SamplesSettings)
    assert SamplesConfig(gamma=None).settings(SamplesSettings).gamma is None
    with pytest.raises(CastloraError, match=r"rounds_per_run=0 must be >= 1; leave it unset \(null\)"):
        IterationAssetConfig(rounds_per_run=0).settings(IterationRun)
    with pytest.raises(CastloraError, match="Unknown evaluation variant"):
        EvaluationAssetConfig(variants=["dreambooth", "magic"]).settings(EvaluationAssetConfig.sources[0])


def test_set_values_win_over_the_preset_and_none_takes_the_preset():
    preset = PRESETS["sdxl"]
    config = LoraTrainingConfig(steps=12, mixed_precision="bf16", validation_prompts=["a"])
    resolved = resolve_train_config(config.settings(TrainConfig), preset, "float16")
    assert (resolved.steps, resolved.resolution, resolved.mixed_precision) == (12, 1024, "bf16")
    assert resolve(ClassImagesConfig(resolution=512).settings(ClassImageConfig), preset).resolution == 512
    assert ClassImagesConfig(detection_threshold=0.3).settings(SegmentConfig) == SegmentConfig(detection_threshold=0.3)


# What the launchpad resolved to with nothing set, computed with castlora's code before the settings were declared
# once (commit 174eec9: `config.steps or preset.train_steps`, `config.resolution or preset.resolution`,
# mixed_precision "auto" → the base model's dtype), for each preset and both base-model dtypes.
_TODAY_TRAIN = dict(
    batch_size=1, lr=0.0001, lr_scheduler="constant", lr_warmup_steps=0, rank=32, alpha=32.0,
    targets=("to_q", "to_k", "to_v", "to_out.0"), train_text_encoder=False, text_encoder_lr=None, segmix_p=0.3,
    segmix_draw="shared", prior_weight=1.0, dco_beta=0.0, kl_weight=0.0, dpo_beta=0.0, masked_loss=False,
    mask_normalization="mean", gradient_checkpointing=False, compile_unet=False, use_8bit_adam=False,
    adam_weight_decay=0.0001, gradient_accumulation_steps=1, seed=0, checkpoint_every=50, keep_checkpoints=2,
    log_every=10, max_grad_norm=1.0,
)  # fmt: skip
TODAY_TRAIN = {
    ("tiny", "float32"): {**_TODAY_TRAIN, "steps": 30, "resolution": 256, "mixed_precision": "no"},
    ("tiny", "float16"): {**_TODAY_TRAIN, "steps": 30, "resolution": 256, "mixed_precision": "fp16"},
    ("sdxl", "float32"): {**_TODAY_TRAIN, "steps": 800, "resolution": 1024, "mixed_precision": "no"},
    ("sdxl", "float16"): {**_TODAY_TRAIN, "steps": 800, "resolution": 1024, "mixed_precision": "fp16"},
}
_TODAY_ITERATION = dict(
    min_dnc=None, kl_weight=1.0, distance_fraction=0.8, convergence="kept_ratio", d_conv=None, min_improvement=0.0,
    gamma=1.0, dnc_mode="default", dnc_embedder="dinov2", preference=False, dpo_beta=5000.0, dpo_steps=200,
    preference_margin=0.05,
)  # fmt: skip
TODAY_ITERATION = {
    "tiny": {**_TODAY_ITERATION, "images_per_round": 4, "keep_top": 2, "train_steps": 10, "max_rounds": 2},
    "sdxl": {**_TODAY_ITERATION, "images_per_round": 200, "keep_top": 50, "train_steps": 1000, "max_rounds": 5},
}
_TODAY_CLASS = dict(guidance_scale=5.0, seed=0, prompt_template="a photo of a {class_noun}", negative_prompt="",
                    batch_size=4)  # fmt: skip
TODAY_CLASS_IMAGES = {
    "tiny": {**_TODAY_CLASS, "count": 4, "resolution": 256, "steps": 2},
    "sdxl": {**_TODAY_CLASS, "count": 100, "resolution": 1024, "steps": 30},
}
TODAY_CANVAS = {"tiny": (256, 256), "sdxl": (1024, 1024)}
# The FLUX.1 presets share the run defaults of their SDXL counterparts (inference steps aside, read from the preset),
# except the guidance: FLUX.1-dev's distilled 3.5 (schnell has no guidance input: 0.0) instead of SDXL's CFG 5.0.
for _table in (TODAY_ITERATION, TODAY_CLASS_IMAGES, TODAY_CANVAS):
    _table.update({"tiny-flux": _table["tiny"], "flux": _table["sdxl"], "flux-schnell": _table["sdxl"]})
TODAY_CLASS_IMAGES["tiny-flux"] = {**TODAY_CLASS_IMAGES["tiny"], "guidance_scale": 3.5}
TODAY_CLASS_IMAGES["flux"] = {**TODAY_CLASS_IMAGES["sdxl"], "guidance_scale": 3.5}
TODAY_CLASS_IMAGES["flux-schnell"] = {**TODAY_CLASS_IMAGES["sdxl"], "steps": 4, "guidance_scale": 0.0}
RENDER_GUIDANCE = {"tiny": 5.0, "sdxl": 5.0, "tiny-flux": 3.5, "flux": 3.5, "flux-schnell": 0.0}


@pytest.mark.parametrize(("preset", "dtype"), sorted(TODAY_TRAIN))
def test_untouched_lora_launchpad_resolves_to_the_settings_castlora_trained_with_before(preset, dtype):
    resolved = resolve_train_config(LoraTrainingConfig().settings(TrainConfig), PRESETS[preset], dtype)
    assert resolved == TrainConfig(**TODAY_TRAIN[(preset, dtype)])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_untouched_launchpads_resolve_as_before(preset):
    model = PRESETS[preset]
    assert resolve(IterationAssetConfig().settings(IterationConfig), model) == IterationConfig(
        **TODAY_ITERATION[preset]
    )
    assert resolve(ClassImagesConfig().settings(ClassImageConfig), model) == ClassImageConfig(
        **TODAY_CLASS_IMAGES[preset]
    )
    assert ClassImagesConfig().settings(SegmentConfig) == SegmentConfig()
    bank = SegMixBankConfig().bank_config(model)
    assert bank.segmix.canvas == TODAY_CANVAS[preset]
    assert dataclasses.replace(bank.segmix, canvas=(1024, 1024)) == type(bank.segmix)()  # everything else as before
    assert (bank.n_instance, bank.n_prior, bank.seed) == (64, 32, 0)
    samples = resolve(SamplesConfig().settings(SamplesSettings), model)
    assert (samples.steps, samples.resolution, samples.gamma, samples.seeds) == (
        model.inference_steps,
        model.resolution,
        1.0,
        (0, 1),
    )
    render = resolve(EvaluationAssetConfig().settings(QualityRenderSettings), model)
    assert (render.inference_steps, render.resolution, render.negative_prompt) == (
        model.inference_steps,
        model.resolution,
        "sticker, collage",
    )
    assert (samples.guidance_scale, render.guidance_scale, samples.true_cfg_scale, render.true_cfg_scale) == (
        RENDER_GUIDANCE[preset],
        RENDER_GUIDANCE[preset],
        1.0,
        1.0,
    )
    assert IterationAssetConfig().settings(IterationRun) == IterationRun(seed=0, rounds_per_run=None)


def test_old_launchpad_values_under_the_same_names_still_work():
    """A run config saved from the old launchpad: background as ``r,g,b``, an empty ``relative_scale`` mapping."""
    bank = SegMixBankConfig(background="128,128,128", relative_scale={}, canvas_width=512).bank_config(PRESETS["sdxl"])
    assert bank.segmix.background == (128, 128, 128) and bank.segmix.relative_scale is None
    assert bank.segmix.canvas == (512, 1024)


SAMPLES_LAUNCHPAD_YAML = """
ops:
  samples:
    config:
      llm_layout_retries: 1
      prompts:
        - "A photo of olis dog and vrin dog in a park"
        - prompt: "A photo of olis dog sitting on vrin dog"
          layout: {mode: boxes, boxes: {dog6: [0.3, 0.05, 0.7, 0.55], dog2: [0.2, 0.45, 0.8, 1.0]}}
        - prompt: "A photo of olis dog and vrin dog on a sofa"
          layout: {mode: sizes, sizes: {dog6: 2, dog2: 1}}
        - prompt: "A photo of olis dog chasing vrin dog"
          layout: llm
"""


def test_samples_launchpad_takes_a_layout_per_prompt_and_old_prompt_lists_stay_valid():
    """The README's launchpad example goes through Dagster's config system into checked prompt entries
    (docs/design.md#layout-control); a plain list of prompt texts still means the auto layout."""
    seen = {}

    @dg.asset(name="samples")
    def probe(config: SamplesConfig) -> None:
        seen["entries"] = config.settings(SamplesSettings).prompt_entries(["dog6", "dog2"])
        seen["retries"] = config.settings(SamplesSettings).llm_layout_retries

    assert dg.materialize([probe], run_config=yaml.safe_load(SAMPLES_LAUNCHPAD_YAML)).success
    entries = seen["entries"]
    assert [e.layout.mode for e in entries] == ["auto", "boxes", "sizes", "llm"] and seen["retries"] == 1
    assert entries[1].layout.boxes["dog2"] == (0.2, 0.45, 0.8, 1.0)
    old = SamplesConfig(prompts=["a photo of x", "a photo of y"]).settings(SamplesSettings)
    assert [(e.prompt, e.layout.mode) for e in old.prompt_entries(["dog6", "dog2"])] == [
        ("a photo of x", "auto"),
        ("a photo of y", "auto"),
    ]
    bad = SamplesConfig(prompts=[{"prompt": "p", "layout": {"boxes": {"dog6": [0, 0, 1, 1]}}}])
    with pytest.raises(CastloraError, match=r"samples prompt 1 \('p'\).*missing \['dog2'\]"):
        bad.settings(SamplesSettings).prompt_entries(["dog6", "dog2"])
    with pytest.raises(CastloraError, match="llm_layout_retries=-1 must be >= 0"):
        SamplesConfig(llm_layout_retries=-1).settings(SamplesSettings)
