"""Resolve model references to something ``from_pretrained`` can load, with errors a person can act on."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ModelLoadError
from pipeline.storage.atomic import atomic_dir

TINY_PREFIX = "tiny:"
TINY_VERSION = "2"
"""Bump when a tiny builder changes, so stale cached tiny models are rebuilt."""

# name -> "module:function"; the function builds the model into an empty directory.
TINY_BUILDERS: dict[str, str] = {
    "owlv2": "pipeline.models.tiny_vision:build_tiny_owlv2",
    "sam": "pipeline.models.tiny_vision:build_tiny_sam",
    "sdxl": "pipeline.models.tiny_sdxl:build_tiny_sdxl",
    "flux": "pipeline.models.tiny_flux:build_tiny_flux",
    "flux-schnell": "pipeline.models.tiny_flux:build_tiny_flux_schnell",
    "vlm": "pipeline.models.tiny_vlm:build_tiny_vlm",
    "vlm-chat": "pipeline.models.tiny_vlm:build_tiny_chat_vlm",
    "yolo-world": "pipeline.models.tiny_ultralytics:build_tiny_yolo_world",
    "ultralytics-sam": "pipeline.models.tiny_ultralytics:build_tiny_ultralytics_sam",
    "dinov2": "pipeline.models.tiny_embedders:build_tiny_dinov2",
    "clip": "pipeline.models.tiny_embedders:build_tiny_clip",
}

T = TypeVar("T")


def ensure_tiny(name: str, cache_root: Path) -> Path:
    """Directory of tiny model ``name``, building it on first use (atomic: build in a temp dir, rename)."""
    if name not in TINY_BUILDERS:
        raise ModelLoadError(f"Unknown tiny model 'tiny:{name}'; known: {sorted(TINY_BUILDERS)}.")
    target = cache_root / "tiny" / f"{name}-v{TINY_VERSION}"
    if (target / ".complete").exists():
        return target
    module_name, function_name = TINY_BUILDERS[name].split(":")
    builder: Callable[[Path], None] = getattr(importlib.import_module(module_name), function_name)
    with atomic_dir(target) as staging:
        builder(staging)
        (staging / ".complete").write_text("ok\n")
    return target


def resolve_model(reference: str, cache_root: Path, what: str, expect_file: str | None = "config.json") -> str:
    """Turn a preset reference into a local directory or a hub id.

    ``tiny:<name>`` builds/loads the tiny model; an existing path must be a directory holding
    ``expect_file``; anything else is treated as a hub id (loadable only when already in the local HF cache,
    since castlora's machines have no hub access).
    """
    if reference.startswith(TINY_PREFIX):
        return str(ensure_tiny(reference[len(TINY_PREFIX) :], cache_root))
    path = Path(reference).expanduser()
    if reference.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{what}: model directory {path} does not exist. Point the preset or resource at a folder "
                f"saved with save_pretrained (containing {expect_file or 'the model files'})."
            )
        if expect_file and not (path / expect_file).exists():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ModelLoadError(
                f"{what}: {path} is not a saved model directory: {expect_file} is missing (found: {found})."
            )
        return str(path.resolve())
    return reference


def load_pretrained(loader: Callable[..., T], source: str, what: str, **kwargs: Any) -> T:
    """Call ``loader(source, **kwargs)`` (a ``from_pretrained``) and turn failures into one clear error."""
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            " HF_HUB_OFFLINE=1 is set, so a hub id loads only from the local Hugging Face cache;"
            " download it elsewhere and point the preset at the local directory."
            if offline and not Path(source).exists()
            else ""
        )
        raise ModelLoadError(f"{what}: could not load from {source!r}: {exc}.{hint}") from exc


def release_memory() -> None:
    """Return freed model memory: collect cycles (pipelines hold some) and empty the CUDA cache when present.

    Call after dropping the last reference to a model, before loading the next one.
    """
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
