"""Feeding models: split work into batches and move processor outputs to the model's device and dtype."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def index_chunks(count: int, size: int) -> list[range]:
    """``range(count)`` cut into consecutive ranges of at most ``size`` indices."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def to_device(inputs: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors moved to ``device``; floating-point ones also cast to ``dtype`` (token ids stay integers)."""
    moved: dict[str, Any] = {}
    for key, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s weights are (its first parameter's device; CPU for a module without any)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
