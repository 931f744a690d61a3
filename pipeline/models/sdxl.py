"""The base-model reference (``BaseModelSpec``) and the SDXL pipeline loader.

Callers load through ``pipeline.families.load_base_pipeline``, which hands the spec to the loader of the family
it names (docs/design.md#model-families); ``load_sdxl_pipeline`` here is the SDXL family's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from pipeline.errors import CastloraError, ModelLoadError
from pipeline.models.loading import load_pretrained, resolve_model

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class BaseModelSpec:
    source: str
    """``tiny:sdxl``, a local diffusers directory (with model_index.json) or a hub id in the local cache."""
    family: str = "sdxl"
    """Key of ``pipeline.families.FAMILIES``: which family loads ``source``."""
    vae_source: str | None = None
    """Replacement VAE (directory or id), e.g. ``madebyollin/sdxl-vae-fp16-fix``: SDXL's own VAE overflows
    in float16."""
    dtype: str = "float32"
    device: str = "cpu"


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CastloraError(f"Unknown dtype {name!r} for the base model; choose one of {sorted(DTYPES)}.") from None


def _check_pipeline_class(source: str, expected_prefix: str, what: str) -> None:
    """Refuse a directory saved from another pipeline class, before from_pretrained fails less clearly."""
    index_file = Path(source) / "model_index.json"
    if not index_file.is_file():
        return  # a hub id: from_pretrained reports its own problems, wrapped by load_pretrained
    try:
        class_name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{what}: {index_file} is not a readable model_index.json: {exc}.") from exc
    if not str(class_name).startswith(expected_prefix):
        raise ModelLoadError(
            f"{what}: {index_file} describes a {class_name or 'pipeline without _class_name'}, "
            f"but the {expected_prefix} family needs a {expected_prefix}Pipeline directory."
        )


def _load_vae(vae_source: str, cache_root: Path, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE saved on its own (config.json at the top) or the ``vae/`` folder of a full pipeline directory."""
    what = "replacement VAE"
    local = Path(vae_source).expanduser()
    if local.is_dir() and not (local / "config.json").exists() and (local / "vae" / "config.json").exists():
        return load_pretrained(AutoencoderKL.from_pretrained, str(local), what, subfolder="vae", dtype=dtype)
    resolved = resolve_model(vae_source, cache_root, what, expect_file="config.json")
    return load_pretrained(AutoencoderKL.from_pretrained, resolved, what, dtype=dtype)


def load_sdxl_pipeline(spec: BaseModelSpec, cache_root: Path) -> StableDiffusionXLPipeline:
    what = "base model (SDXL)"
    dtype = torch_dtype(spec.dtype)
    source = resolve_model(spec.source, cache_root, what, expect_file="model_index.json")
    _check_pipeline_class(source, "StableDiffusionXL", what)
    extra: dict[str, object] = {}
    if spec.vae_source:
        extra["vae"] = _load_vae(spec.vae_source, cache_root, dtype)
    # No invisible watermark: it needs an optional package and would alter training images.
    pipe = load_pretrained(
        StableDiffusionXLPipeline.from_pretrained,
        source,
        what,
        dtype=dtype,
        add_watermarker=False,
        **extra,
    )
    try:
        pipe = pipe.to(spec.device)
    except (RuntimeError, AssertionError) as exc:  # e.g. "cuda" on a machine without a GPU
        raise ModelLoadError(f"{what}: cannot move the pipeline to device {spec.device!r}: {exc}.") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
