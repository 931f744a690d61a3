"""The base-model reference (``BaseModelSpec``) and the loading every diffusers family shares.

Callers load through ``pipeline.families.load_base_pipeline``, which hands the spec to the loader of the family
it names (docs/design.md#model-families). ``load_diffusers_pipeline`` is what those loaders share: resolve the
reference, check the pipeline class, swap the VAE, move to the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

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


def load_diffusers_pipeline(
    spec: BaseModelSpec, cache_root: Path, pipeline_class: type[DiffusionPipeline], what: str, **kwargs: Any
) -> Any:
    """``pipeline_class.from_pretrained`` of ``spec.source`` (a directory saved from that class, checked first),
    with ``spec.vae_source`` swapped in, on ``spec.device`` in ``spec.dtype``, progress bars off."""
    dtype = torch_dtype(spec.dtype)
    source = resolve_model(spec.source, cache_root, what, expect_file="model_index.json")
    _check_pipeline_class(source, pipeline_class.__name__.removesuffix("Pipeline"), what)
    if spec.vae_source:
        kwargs["vae"] = _load_vae(spec.vae_source, cache_root, dtype)
    pipe = load_pretrained(pipeline_class.from_pretrained, source, what, dtype=dtype, **kwargs)
    try:
        pipe = pipe.to(spec.device)
    except (RuntimeError, AssertionError) as exc:  # e.g. "cuda" on a machine without a GPU
        raise ModelLoadError(f"{what}: cannot move the pipeline to device {spec.device!r}: {exc}.") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
