from pathlib import Path

import pytest

from pipeline.errors import CastloraError, ModelLoadError
from pipeline.models.presets import get_preset
from resources import ModelResource


def test_preset_overrides_and_auto_device():
    resource = ModelResource(preset="tiny", segmenter_backend="owlv2_sam", detector="/models/owl", device="cpu")
    preset = resource.resolved_preset()
    assert preset.detector == "/models/owl" and preset.sam == "tiny:sam"
    assert preset.segmenter_backend == "owlv2_sam"
    assert resource.torch_dtype_name() == "float32"
    assert resource.segmenter_model_ids() == ["/models/owl", "tiny:sam"]


def test_unknown_preset_is_refused_with_the_presets():
    """``preset`` is a config enum: a misspelt name is refused when the resource is built, listing every preset."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"preset\n.*'tiny', 'sdxl', 'tiny-flux', 'flux' or 'flux-schnell'"):
        ModelResource(preset="sdxl-turbo")


def test_launchpad_refuses_a_misspelt_preset_before_the_run():
    """In the launchpad the preset is an enum: ``tinyflux`` is a config error (shown before launch), ``tiny-flux``
    runs with the FLUX.1 preset."""
    import dagster as dg

    @dg.asset
    def family(models: ModelResource) -> str:
        return models.resolved_preset().family

    def run(preset: str) -> dg.ExecuteInProcessResult:
        config = {"resources": {"models": {"config": {"preset": preset}}}}
        return dg.materialize([family], resources={"models": ModelResource()}, run_config=config)

    assert run("tiny-flux").output_for_node("family") == "flux"
    with pytest.raises(dg.DagsterInvalidConfigError, match=r"preset not in enum type PresetName got tinyflux"):
        run("tinyflux")


def test_castlora_preset_env_is_named_when_unknown():
    from assets.definitions import build_resources

    assert build_resources({"CASTLORA_PRESET": "tiny-flux"})["models"].resolved_preset().family == "flux"
    with pytest.raises(CastloraError, match=r"CASTLORA_PRESET='tiny_flux': Unknown model preset 'tiny_flux'"):
        build_resources({"CASTLORA_PRESET": "tiny_flux"})


def test_wrong_base_model_dir_names_the_path(tmp_path):
    load = ModelResource(base_model=str(tmp_path / "nope"), device="cpu").base_pipeline_factory(tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=r"nope.*model_index.json"):
        load()


def test_unknown_family_is_refused(tmp_path):
    load = ModelResource(family="flux-dit", device="cpu").base_pipeline_factory(tmp_path / "cache")
    with pytest.raises(CastloraError, match=r"Unknown base model family 'flux-dit'.*'flux'.*'sdxl'"):
        load()


def test_a_family_that_does_not_match_the_folder_is_refused(tmp_path):
    """FLUX.1 asked for, the tiny preset's SDXL folder given: one error naming the folder's class and the family's."""
    load = ModelResource(family="flux", device="cpu").base_pipeline_factory(tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=r"StableDiffusionXLPipeline.*Flux family needs a FluxPipeline"):
        load()


def test_wrong_vae_dir_is_named(tmp_path):
    (tmp_path / "vae").mkdir()
    load = ModelResource(vae=str(tmp_path / "vae"), device="cpu").base_pipeline_factory(Path(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load()


def test_dnc_scorer_follows_the_preset_and_reports_missing_models(tmp_path):
    from PIL import Image

    from pipeline.dnc.image_scores import SubjectReferences

    subjects = [
        SubjectReferences(cid, "dog", [Image.new("RGB", (32, 32), colour), Image.new("RGB", (32, 40), colour)])
        for cid, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200)))
    ]
    tiny = ModelResource(preset="tiny").dnc_scorer(subjects, tmp_path)
    assert tiny.detector.label == "layout (no detector)"
    assert set(tiny.embedders) == {"dinov2", "clip", "dreamsim_style"} and not tiny.unavailable
    owl = ModelResource(preset="tiny", dnc_detector="owlv2", clip=str(tmp_path / "no_clip")).dnc_scorer(
        subjects, tmp_path
    )
    assert owl.detector.label == "owlv2"
    assert set(owl.embedders) == {"dinov2"}
    assert str(tmp_path / "no_clip") in owl.unavailable["clip"] and "clip" in owl.unavailable["dreamsim_style"]
    clip_t, why = ModelResource(preset="tiny", clip=str(tmp_path / "no_clip")).clip_t_scorer(tmp_path, owl)
    assert clip_t is None and "does not exist" in why
    clip_t, why = ModelResource(preset="tiny").clip_t_scorer(tmp_path, tiny)
    assert why == "" and clip_t([Image.new("RGB", (32, 32))], ["a dog"]).shape == (1,)


def test_model_overrides_are_the_presets_model_choices_declared_once():
    from dataclasses import fields

    from pipeline.models.presets import ModelChoice
    from pipeline.settings import field_docs

    choices = [f.name for f in fields(ModelChoice)]
    assert [name for name in ModelResource.model_fields if name in choices] == choices
    for name in choices:
        doc = " ".join(field_docs(ModelChoice)[name].split())
        info = ModelResource.model_fields[name]
        assert doc and info.default is None and info.description.startswith(doc)
    assert ModelResource(preset="sdxl").resolved_preset() == get_preset("sdxl")  # nothing set: the preset's models
    overridden = ModelResource(preset="tiny", dnc_threshold=0.25, ultralytics_sam="/m/sam.pt").resolved_preset()
    assert (overridden.dnc_threshold, overridden.ultralytics_sam, overridden.detector) == (
        0.25,
        "/m/sam.pt",
        "tiny:owlv2",
    )


def test_an_empty_model_override_is_refused_by_name():
    with pytest.raises(CastloraError, match=r"\['detector'\] are empty strings: leave them unset"):
        ModelResource(detector="").resolved_preset()


@pytest.mark.parametrize("resource", ["ModelResource", "CaptionerResource", "StorageResource"])
def test_every_resource_field_has_a_launchpad_description(resource):
    """The launchpad shows a field's pydantic description: the docstring under each field must reach it (without
    ``use_attribute_docstrings`` Dagster showed ``preset``, ``device`` and every storage field undocumented)."""
    import resources

    schema = getattr(resources, resource).to_config_schema().as_field().config_type.fields
    undocumented = sorted(name for name, field in schema.items() if not (field.description or "").strip())
    assert not undocumented, f"{resource} fields without a launchpad description: {undocumented}"


def test_preset_description_names_every_preset():
    from pipeline.models.presets import PRESETS

    description = ModelResource.to_config_schema().as_field().config_type.fields["preset"].description
    assert all(f"``{name}``" in description for name in PRESETS), description
