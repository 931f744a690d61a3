"""Paths inside stored records (stage manifests, ``current.json`` files) that point into the same pair folder
are written relative to the record's own folder, so a data home can be moved, copied or mounted at another path
(another machine, a container, a restored backup) and every record still resolves. Readers always get absolute
paths back. Paths outside the pair folder (the user's source photos) stay absolute, and so does everything
written outside a registered pair folder (no ``pair.json`` above it: ad-hoc runs from a notebook or a test).
Records written with absolute paths read as they always did.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.storage.paths import PAIR_SPEC_FILE


def pair_folder_of(folder: Path) -> Path | None:
    """The registered pair folder (the nearest one holding ``pair.json``) that ``folder`` lies in, if any."""
    folder = Path(folder).resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / PAIR_SPEC_FILE).is_file():
            return candidate
    return None


def stored_path(value: Any, folder: Path, within: Path | None) -> Any:
    """``value`` as a record in ``folder`` keeps it: relative to ``folder`` when it lies in ``within``, else
    absolute (a relative value given to a writer means the working directory, never the record's folder)."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        return value
    path = Path(value)
    if within is not None and path.resolve().is_relative_to(Path(within).resolve()):
        return Path(os.path.relpath(path.resolve(), Path(folder).resolve())).as_posix()
    return str(path.absolute())


def loaded_path(value: Any, folder: Path) -> Any:
    """A stored path as an absolute one: relative values are relative to the record's ``folder``."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    return str((Path(folder) / value).resolve())


def store_paths(record: dict[str, Any], folder: Path, keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``record`` with the path values under ``keys`` made relative for a file in ``folder``."""
    pair_folder = pair_folder_of(folder)
    return {k: stored_path(v, folder, pair_folder) if k in keys else v for k, v in record.items()}


def load_paths(record: dict[str, Any], folder: Path, keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``record`` (read from a file in ``folder``) with the path values under ``keys`` absolute."""
    return {k: loaded_path(v, folder) if k in keys else v for k, v in record.items()}
