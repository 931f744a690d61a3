from pathlib import Path

import pytest

from pipeline.errors import CastloraError, ModelLoadError
from resources import ModelResource


def test_preset_overrides_and_auto_device():
    resource = ModelResource(preset="tiny", segmenter_backend="owlv2_sam", detector="/models/owl", device="cpu")
    preset = resource.resolved_preset()
    assert preset.detector == "/models/owl" and preset.sam == "tiny:sam"
    assert preset.segmenter_backend == "owlv2_sam"
    assert resource.torch_dtype_name() == "float32"
    assert resource.segmenter_model_ids() == ["/models/owl", "tiny:sam"]


def test_unknown_preset_is_named():
    with pytest.raises(CastloraError, match="Unknown model preset 'sdxl-turbo'"):
        ModelResource(preset="sdxl-turbo").resolved_preset()


def test_wrong_base_model_dir_names_the_path(tmp_path):
    load = ModelResource(base_model=str(tmp_path / "nope"), device="cpu").base_pipeline_factory(tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=r"nope.*model_index.json"):
        load()


def test_unknown_family_is_refused(tmp_path):
    load = ModelResource(family="flux", device="cpu").base_pipeline_factory(tmp_path / "cache")
    with pytest.raises(CastloraError, match="flux"):
        load()


def test_wrong_vae_dir_is_named(tmp_path):
    (tmp_path / "vae").mkdir()
    load = ModelResource(vae=str(tmp_path / "vae"), device="cpu").base_pipeline_factory(Path(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load()
