"""Settings declared once: a frozen dataclass field, its default and the docstring written under it.

Every settings dataclass (``TrainConfig``, ``IterationConfig``, ``ClassImageConfig``, ...) is the one declaration
of its settings. The Dagster launchpad (``assets/launchpad.py``) is derived from these fields and shows their
docstrings; the model preset fills what a run leaves unset. Three markers, each a ``dataclasses.field``:

- ``from_preset("train_steps")``: ``None`` means "not set", and ``resolve`` replaces it by that attribute of the
  model preset (``pipeline.models.presets.ModelPreset``). There is no other "use the preset" value (no ``0``).
- ``internal(default)``: a field other code sets (e.g. the iteration loop's ``kl_weight``), not shown to users.
- ``family_option(default)``: a setting only some model families read (FLUX.1's σ sampling, training guidance,
  true CFG): a family that does not read it refuses any value other than ``default``, naming the field
  (docs/design.md#flux1-run-settings).
- a plain default: the same answer for every preset.

docs/design.md#settings describes the whole scheme.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from typing import Any, TypeVar

from pipeline.errors import CastloraError

PRESET_ATTRIBUTE = "castlora.preset_attribute"
"""Field metadata key: the ``ModelPreset`` attribute that fills this field when it is None."""
INTERNAL = "castlora.internal"
"""Field metadata key: True for fields the launchpad does not offer."""
FAMILY_OPTION = "castlora.family_option"
"""Field metadata key: True for settings that only the model families naming them in ``ModelFamily.options`` read."""

Settings = TypeVar("Settings")


ZERO_IS_A_VALUE = "castlora.zero_is_a_value"
"""Field metadata key: True for a ``from_preset`` field where 0 never stood for the preset's default (a guidance
scale of 0 is a real value), so the launchpad does not refuse it."""


def from_preset(attribute: str, *, zero_is_a_value: bool = False) -> Any:
    """A field that is ``None`` until ``resolve`` fills it from ``preset.<attribute>``. ``zero_is_a_value``: 0 is a
    setting like any other (the launchpad refuses 0 for the older fields, where it once meant "the preset's")."""
    metadata = {PRESET_ATTRIBUTE: attribute, **({ZERO_IS_A_VALUE: True} if zero_is_a_value else {})}
    return dataclasses.field(default=None, metadata=metadata)


def internal(default: Any) -> Any:
    """A field that castlora sets itself (from another stage's settings): kept out of the launchpad."""
    return dataclasses.field(default=default, metadata={INTERNAL: True})


def family_option(default: Any) -> Any:
    """A setting that only some model families read (each family lists those it reads in ``ModelFamily.options``);
    any other family accepts it only at ``default``."""
    return dataclasses.field(default=default, metadata={FAMILY_OPTION: True})


def family_option_fields(cls_or_settings: Any) -> tuple[dataclasses.Field, ...]:
    """The ``family_option`` fields of a settings dataclass (or instance), in declaration order."""
    return tuple(f for f in dataclasses.fields(cls_or_settings) if f.metadata.get(FAMILY_OPTION))


def changed_family_options(settings: Any) -> dict[str, tuple[Any, Any]]:
    """``{field: (value, default)}`` for each family option of ``settings`` that is not at its default."""
    found = {f.name: (getattr(settings, f.name), f.default) for f in family_option_fields(settings)}
    return {name: pair for name, pair in found.items() if pair[0] != pair[1]}


def identity_record(settings: Any) -> dict[str, Any]:
    """``dataclasses.asdict(settings)`` less the family options at their defaults: what a run's identity (a hash, a
    version) records, so adding a family option (or running another family) changes no existing identity."""
    record = dataclasses.asdict(settings)
    for f in family_option_fields(settings):
        if record[f.name] == f.default:
            record.pop(f.name)
    return record


def preset_attribute(field: dataclasses.Field) -> str | None:
    return field.metadata.get(PRESET_ATTRIBUTE)


def user_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields a user may set (every field not marked ``internal``), in declaration order."""
    return tuple(f for f in dataclasses.fields(cls) if not f.metadata.get(INTERNAL))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal written under each field, base classes included.

    Python keeps no attribute docstrings at run time, so they are read from the class source; a field without
    one maps to ``""`` (``tests/assets/test_launchpad_configs.py`` requires one for every launchpad field).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError) as exc:
            raise CastloraError(f"Cannot read the source of {klass.__qualname__} for its field docs: {exc}") from exc
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, [*body[1:], None], strict=True):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            doc = ""
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                doc = inspect.cleandoc(following.value.value)
            docs[node.target.id] = doc
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def unresolved(settings: Any) -> list[str]:
    """The ``from_preset`` fields of ``settings`` that are still None."""
    return [f.name for f in dataclasses.fields(settings) if preset_attribute(f) and getattr(settings, f.name) is None]


def resolve(settings: Settings, preset: Any) -> Settings:
    """``settings`` with every unset (None) ``from_preset`` field replaced by the preset's value: the one place
    where a run's settings meet the model preset's defaults. A family option that the preset's model family does not
    read, or a value the family refuses, is an error here, by name, before any model loads
    (``ModelFamily.with_options``)."""
    family_name = getattr(preset, "family", None)
    if family_name is not None and changed_family_options(settings):
        # Imported here: the families pull in diffusers, and this module is imported by light settings modules.
        from pipeline.families import get_family

        get_family(family_name).with_options(settings)
    filled = {
        f.name: getattr(preset, attribute)
        for f in dataclasses.fields(settings)  # type: ignore[arg-type]
        if (attribute := preset_attribute(f)) and getattr(settings, f.name) is None
    }
    return dataclasses.replace(settings, **filled) if filled else settings  # type: ignore[type-var]
