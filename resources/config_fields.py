"""Dagster config fields derived from settings dataclasses, so a setting is declared once (``pipeline/settings.py``).

Each dataclass field becomes a pydantic field with the same name, a Dagster-friendly type (tuples become lists),
the same default and the field's docstring as its description; a ``from_preset`` field's description also lists
what each model preset fills in. The launchpad configs (``assets/launchpad.py``) and the models resource's
overrides are built from these.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any

from pydantic import Field
from pydantic.fields import FieldInfo

from pipeline.errors import CastloraError
from pipeline.models.presets import PRESETS
from pipeline.settings import field_docs, preset_attribute


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_type(annotation: Any) -> Any:
    """The type Dagster's config system can show for a dataclass annotation: ``tuple[X, ...]`` → ``list[X]``; a
    union that includes ``str`` (``str | tuple[int, int, int]``) → ``str`` (the launchpad offers the text form)."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        items = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        return list[items.pop()] if len(items) == 1 else list[Any]
    if _text_or_tuple(annotation):
        return str | None if type(None) in typing.get_args(annotation) else str
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(config_type(m) for m in typing.get_args(annotation))]  # noqa: UP007 - from a tuple
    return annotation


def _text_or_tuple(annotation: Any) -> bool:
    """A union of ``str`` and a tuple, e.g. a colour ``"white" | (r, g, b)``."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return str in members and any(typing.get_origin(m) is tuple for m in members)


def _config_default(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def preset_note(attribute: str) -> str:
    """What each model preset fills in for a ``from_preset`` field, e.g. ``tiny: 30, sdxl: 800``."""
    return ", ".join(f"{name}: {getattr(preset, attribute)}" for name, preset in PRESETS.items())


def description(cls: type, field: dataclasses.Field) -> str:
    doc = " ".join(field_docs(cls)[field.name].split())  # one paragraph in the launchpad
    attribute = preset_attribute(field)
    return f"{doc} [preset default: {preset_note(attribute)}]" if attribute else doc


def config_field(cls: type, field: dataclasses.Field, *, override: bool = False) -> tuple[Any, FieldInfo]:
    """``(type, pydantic Field)`` for one dataclass field; ``override`` makes it optional with default None (not set:
    keep what the dataclass instance has)."""
    annotation = config_type(_type_hints(cls)[field.name])
    text = description(cls, field)
    if override:
        return annotation | None, Field(default=None, description=f"{text} Not set: the preset's.")
    if field.default is not dataclasses.MISSING:
        default = _config_default(field.default)
        if isinstance(default, list | dict):
            return annotation, Field(default_factory=lambda value=default: type(value)(value), description=text)
        return annotation, Field(default=default, description=text)
    if field.default_factory is not dataclasses.MISSING:
        factory = field.default_factory
        return annotation, Field(default_factory=lambda: _config_default(factory()), description=text)
    return annotation, Field(description=text)


def from_config_value(cls: type, name: str, value: Any) -> Any:
    """A launchpad value back in the dataclass's type: lists become tuples where the field is a tuple; where the
    field takes text or a tuple (a colour: ``white`` or ``(r, g, b)``), text with commas is the tuple."""
    annotation = _type_hints(cls)[name]
    if isinstance(value, list) and typing.get_origin(annotation) is tuple:
        return tuple(value)
    if isinstance(value, str) and "," in value and _text_or_tuple(annotation):
        try:
            return tuple(int(part) for part in value.split(","))
        except ValueError:
            raise CastloraError(f"{cls.__name__}.{name}={value!r}: expected comma-separated integers.") from None
    return value
