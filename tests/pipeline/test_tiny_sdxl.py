"""The tiny SDXL (a standard diffusers directory that loads and generates on CPU) and base model loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from pipeline.errors import CastloraError, ModelLoadError
from pipeline.families import FAMILIES, load_base_pipeline
from pipeline.models.base_model import BaseModelSpec
from pipeline.models.tiny_sdxl import build_tiny_sdxl
from pipeline.models.tokenizers import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode, write_tiny_clip_tokenizer

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def tiny_pipe(cache_root: Path) -> StableDiffusionXLPipeline:
    """Built on first use through the ``tiny:sdxl`` preset reference, as the assets will do it."""
    return load_base_pipeline(BaseModelSpec(source="tiny:sdxl"), cache_root)


@pytest.fixture(scope="module")
def tiny_dir(tiny_pipe: StableDiffusionXLPipeline, cache_root: Path) -> Path:
    (built,) = (cache_root / "tiny").glob("sdxl-v*")
    return built


def test_tiny_sdxl_is_a_standard_diffusers_directory(tiny_dir: Path) -> None:
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in PIPELINE_PARTS:
        assert (tiny_dir / part).is_dir(), part
    assert list((tiny_dir / "unet").glob("*.safetensors"))
    assert list((tiny_dir / "text_encoder_2").glob("*.safetensors"))

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert pipe.vae_scale_factor == 8


def test_tiny_sdxl_components_are_wired_like_sdxl(tiny_pipe: StableDiffusionXLPipeline) -> None:
    unet, te1, te2 = tiny_pipe.unet.config, tiny_pipe.text_encoder.config, tiny_pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert te1.hidden_size != te2.hidden_size  # so swapping the encoders cannot go unnoticed
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert unet.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.layers_per_block == 2
    assert tiny_pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert te1.vocab_size == len(tiny_pipe.tokenizer)
    assert te2.vocab_size == len(tiny_pipe.tokenizer_2)
    scheduler = tiny_pipe.scheduler.config
    assert type(tiny_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (scheduler.beta_start, scheduler.beta_end) == (0.00085, 0.012)
    assert (scheduler.beta_schedule, scheduler.timestep_spacing, scheduler.steps_offset) == (
        "scaled_linear",
        "leading",
        1,
    )


def test_tiny_sdxl_generates_an_image_of_the_requested_size(tiny_pipe: StableDiffusionXLPipeline) -> None:
    generator = torch.Generator("cpu").manual_seed(0)
    out = tiny_pipe("a photo of a dog", height=64, width=96, num_inference_steps=2, generator=generator)
    (image,) = out.images
    assert image.size == (96, 64)
    pixels = np.asarray(image)
    assert pixels.shape == (64, 96, 3)
    assert pixels.std() > 1.0  # a real decode, not a blank canvas


def test_tiny_sdxl_build_is_reproducible_and_leaves_global_rng_alone(tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    build_tiny_sdxl(tmp_path / "again")
    assert torch.equal(torch.rand(1), expected_next)

    first = load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    second = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_tiny_tokenizers_encode_prompts_within_the_vocabulary(tiny_dir: Path) -> None:
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / name)
        vocab_size = json.loads((tiny_dir / "text_encoder" / "config.json").read_text())["vocab_size"]
        ids = tokenizer("a photo of a fluffy Ünïcode dog 🐕", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77
        assert min(ids) >= 0 and max(ids) < vocab_size
        assert ids[0] == tokenizer.convert_tokens_to_ids(BOS_TOKEN)
        assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) in ids
        # The merges make common prompt words single tokens; unknown words fall back to bytes.
        assert tokenizer.tokenize("photo") == ["photo</w>"]
        assert len(tokenizer.tokenize("zebra")) == 5
    assert CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer_2").pad_token == "!"  # as SDXL's second


def test_write_tiny_clip_tokenizer_files(tmp_path: Path) -> None:
    write_tiny_clip_tokenizer(tmp_path, model_max_length=33)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    byte_chars = set(bytes_to_unicode().values())
    assert len(byte_chars) == 256
    assert byte_chars <= vocab.keys()
    assert {char + "</w>" for char in byte_chars} <= vocab.keys()
    assert vocab[EOS_TOKEN] == max(vocab.values())  # CLIP pools at argmax(ids) == end token
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert CLIPTokenizer.from_pretrained(tmp_path).model_max_length == 33


def test_load_base_pipeline_returns_a_quiet_pipeline_on_the_requested_device(
    tiny_pipe: StableDiffusionXLPipeline,
) -> None:
    assert tiny_pipe.device.type == "cpu"
    assert tiny_pipe.unet.dtype == torch.float32
    assert tiny_pipe._progress_bar_config.get("disable") is True


def test_load_base_pipeline_in_bfloat16(tiny_dir: Path, cache_root: Path) -> None:
    pipe = load_base_pipeline(BaseModelSpec(source=str(tiny_dir), dtype="bfloat16"), cache_root)
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe.text_encoder_2.dtype == torch.bfloat16


def test_vae_override_replaces_the_pipeline_vae(tiny_dir: Path, cache_root: Path, tmp_path: Path) -> None:
    original = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    assert original.config.force_upcast is True
    fixed = AutoencoderKL.from_config({**original.config, "force_upcast": False})  # like the fp16-fix VAE
    fixed.save_pretrained(tmp_path / "vae-fix")
    spec = BaseModelSpec(source=str(tiny_dir), vae_source=str(tmp_path / "vae-fix"))
    assert load_base_pipeline(spec, cache_root).vae.config.force_upcast is False


def test_missing_model_dir_names_the_path_and_the_expected_file(tmp_path: Path, cache_root: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=r"model_index\.json") as caught:
        load_base_pipeline(BaseModelSpec(source=str(missing)), cache_root)
    assert str(missing) in str(caught.value)


def test_dir_without_model_index_names_the_path_and_the_expected_file(tmp_path: Path, cache_root: Path) -> None:
    not_a_model = tmp_path / "just-weights"
    not_a_model.mkdir()
    (not_a_model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"model_index\.json") as caught:
        load_base_pipeline(BaseModelSpec(source=str(not_a_model)), cache_root)
    assert str(not_a_model) in str(caught.value)


def test_dir_of_another_pipeline_class_is_refused(tmp_path: Path, cache_root: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="StableDiffusionPipeline"):
        load_base_pipeline(BaseModelSpec(source=str(tmp_path)), cache_root)


def test_unknown_family_lists_the_known_ones(tiny_dir: Path, cache_root: Path) -> None:
    with pytest.raises(CastloraError, match="flux-dit") as caught:
        load_base_pipeline(BaseModelSpec(source=str(tiny_dir), family="flux-dit"), cache_root)
    assert all(name in str(caught.value) for name in FAMILIES)


def test_unknown_dtype_is_refused(tiny_dir: Path, cache_root: Path) -> None:
    with pytest.raises(CastloraError, match="float8"):
        load_base_pipeline(BaseModelSpec(source=str(tiny_dir), dtype="float8"), cache_root)
