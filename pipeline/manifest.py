"""Stage manifests: one Parquet table per stage and pair, the single source of truth for later stages."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from pipeline.errors import CastloraError
from pipeline.lineage import write_parquet_atomic

MANIFEST_NAME = "manifest.parquet"


def write_manifest(frame: pd.DataFrame, stage_dir: Path, name: str = MANIFEST_NAME) -> Path:
    target = stage_dir / name
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), target)
    return target


def read_manifest(stage_dir: Path, stage: str, name: str = MANIFEST_NAME) -> pd.DataFrame:
    path = stage_dir / name
    if not path.is_file():
        raise CastloraError(f"{path} does not exist: materialize the '{stage}' asset for this pair first.")
    return pd.read_parquet(path)


def prune_unlisted(stage_dir: Path, keep: set[Path], suffixes: tuple[str, ...] = (".png", ".txt")) -> int:
    """Delete files left by an earlier run that the new manifest no longer lists; returns how many."""
    removed = 0
    keep_resolved = {p.resolve() for p in keep}
    for path in stage_dir.rglob("*"):
        if path.is_file() and path.suffix in suffixes and path.resolve() not in keep_resolved:
            path.unlink()
            removed += 1
    return removed
