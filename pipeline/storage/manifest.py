"""Stage manifests: one Parquet table per stage and pair, the single source of truth for later stages.

Columns named ``path``, ``*_path`` (a file) or ``*_paths`` (a list of files) hold artifact paths. Inside a
registered pair folder they are stored relative to the manifest's folder (``pipeline.storage.stored_paths``), so the
data home can move; ``read_manifest`` returns them absolute. Read manifests with it, not ``pd.read_parquet``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.errors import CastloraError
from pipeline.storage.lineage import write_parquet_atomic
from pipeline.storage.stored_paths import loaded_path, pair_folder_of, stored_path

MANIFEST_NAME = "manifest.parquet"


def is_path_column(name: str) -> bool:
    return name == "path" or name.endswith(("_path", "_paths"))


def _map_paths(frame: pd.DataFrame, convert: Callable[[Any], Any]) -> pd.DataFrame:
    """A copy of ``frame`` with ``convert`` applied to every path (and every item of a path list)."""

    def each(value: Any) -> Any:
        if isinstance(value, list | tuple | np.ndarray):
            return [convert(item) for item in value]
        return convert(value)

    frame = frame.copy()
    for column in filter(is_path_column, frame.columns):
        frame[column] = frame[column].map(each)
    return frame


def write_manifest(frame: pd.DataFrame, stage_dir: Path, name: str = MANIFEST_NAME) -> Path:
    target = stage_dir / name
    pair_folder = pair_folder_of(stage_dir)
    frame = _map_paths(frame, lambda value: stored_path(value, stage_dir, pair_folder))
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), target)
    return target


def read_manifest(stage_dir: Path, stage: str, name: str = MANIFEST_NAME) -> pd.DataFrame:
    path = stage_dir / name
    if not path.is_file():
        raise CastloraError(f"{path} does not exist: materialize the '{stage}' asset for this pair first.")
    return _map_paths(pd.read_parquet(path), lambda value: loaded_path(value, stage_dir))


def prune_unlisted(stage_dir: Path, keep: set[Path], suffixes: tuple[str, ...] = (".png", ".txt")) -> int:
    """Delete files left by an earlier run that the new manifest no longer lists; returns how many."""
    removed = 0
    keep_resolved = {p.resolve() for p in keep}
    for path in stage_dir.rglob("*"):
        if path.is_file() and path.suffix in suffixes and path.resolve() not in keep_resolved:
            path.unlink()
            removed += 1
    return removed
