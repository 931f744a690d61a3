"""Model families by name, and the one way to load a base model or find the family of a loaded pipeline
(docs/design.md#model-families).

A preset's ``BaseModelSpec.family`` names the family that loads it; code handed a loaded pipeline asks
``family_for(pipe)``. Adding a family is one module with a ``ModelFamily`` subclass and one entry here (tests
register test-only families with ``register_family``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import CastloraError
from pipeline.families.base import ImageGeometry, ModelFamily, RenderRequest, TrainingObjective
from pipeline.families.flux import FLUX
from pipeline.families.sdxl import SDXL
from pipeline.models.base_model import BaseModelSpec

FAMILIES: dict[str, ModelFamily] = {SDXL.name: SDXL, FLUX.name: FLUX}


def register_family(family: ModelFamily) -> None:
    """Make ``family`` loadable by name and recognisable by ``family_for``."""
    FAMILIES[family.name] = family


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise CastloraError(f"Unknown base model family {name!r}; known families: {sorted(FAMILIES)}.") from None


def find_family(pipe: Any) -> ModelFamily | None:
    """The registered family whose pipelines ``pipe`` is one of, None when no family claims it."""
    return next((family for family in FAMILIES.values() if family.handles(pipe)), None)


def family_for(pipe: Any) -> ModelFamily:
    """The registered family whose pipelines ``pipe`` is one of."""
    family = find_family(pipe)
    if family is not None:
        return family
    raise CastloraError(
        f"No model family handles a {type(pipe).__name__}; known families: {sorted(FAMILIES)} "
        "(load the base model with load_base_pipeline, or register the family)."
    )


def load_base_pipeline(spec: BaseModelSpec, cache_root: Path) -> Any:
    """Load ``spec`` with its family's loader: on ``spec.device`` in ``spec.dtype``, progress bars off."""
    return get_family(spec.family).load(spec, Path(cache_root))


__all__ = [
    "FAMILIES",
    "ImageGeometry",
    "ModelFamily",
    "RenderRequest",
    "TrainingObjective",
    "family_for",
    "find_family",
    "get_family",
    "load_base_pipeline",
    "register_family",
]
