"""Lineage: one Parquet row per artifact, linking it by content hash to the artifacts it was made from.

Rows of one (asset, partition, run) are written together as one Parquet file under
``lineage/<asset_key>/<partition>__<run_id>.parquet`` with a fixed schema, so ``pandas.read_parquet``,
``pyarrow.dataset`` and DuckDB (``read_parquet('lineage/**/*.parquet')``) read the folder as one table.

``artifact_uri`` is the artifact's path relative to the data home when the recorder knows the home and the
artifact lies in it (``pairs/<pair>/<stage>/...``: the same on every machine, and the artifact's key under the
S3 prefix), else the path as given. Artifacts are identified by ``artifact_sha256``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.atomic import atomic_path
from pipeline.storage.paths import validate_key

LINEAGE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("asset_key", pa.string()),
        ("partition_key", pa.string()),
        ("artifact_uri", pa.string()),
        ("artifact_sha256", pa.string()),
        ("parent_sha256s", pa.list_(pa.string())),
        ("params_json", pa.string()),
        ("code_version", pa.string()),
        ("model_ids", pa.list_(pa.string())),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class LineageRecorder:
    """Collects the rows of one asset materialization and writes them in one atomic Parquet file."""

    root: Path
    run_id: str
    asset_key: str
    partition_key: str
    code_version: str
    home: Path | None = None
    """The data home: artifacts inside it are recorded by their path relative to it."""
    started_at: datetime = field(default_factory=utc_now)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self,
        artifact_uri: str | Path,
        artifact_sha256: str,
        parent_sha256s: Iterable[str] = (),
        params: dict[str, Any] | None = None,
        model_ids: Iterable[str] = (),
    ) -> None:
        self.rows.append(
            {
                "run_id": self.run_id,
                "asset_key": self.asset_key,
                "partition_key": self.partition_key,
                "artifact_uri": self._uri(artifact_uri),
                "artifact_sha256": artifact_sha256,
                "parent_sha256s": list(parent_sha256s),
                "params_json": json.dumps(params or {}, sort_keys=True, default=str),
                "code_version": self.code_version,
                "model_ids": list(model_ids),
                "started_at": self.started_at,
                "finished_at": utc_now(),
            }
        )

    def _uri(self, artifact: str | Path) -> str:
        if self.home is not None:
            path, home = Path(artifact).resolve(), Path(self.home).resolve()
            if path.is_relative_to(home):
                return path.relative_to(home).as_posix()
        return str(artifact)

    def flush(self) -> Path | None:
        """Write the collected rows; returns the file written (None when there was nothing to write)."""
        if not self.rows:
            return None
        folder = self.root / self.asset_key.replace("/", "__")
        folder.mkdir(parents=True, exist_ok=True)
        run = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.run_id)
        target = folder / f"{validate_key(self.partition_key)}__{run}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=LINEAGE_SCHEMA)
        write_parquet_atomic(table, target)
        self.rows = []
        return target


def write_parquet_atomic(table: pa.Table, target: Path) -> None:
    with atomic_path(target) as temporary:
        pq.write_table(table, temporary)


def read_lineage(root: Path) -> pa.Table:
    """All lineage rows under ``root`` as one table (empty, with the schema, when there are none)."""
    files = sorted(p for p in Path(root).rglob("*.parquet") if not p.name.startswith(".tmp-"))
    if not files:
        return LINEAGE_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=LINEAGE_SCHEMA) for f in files)


def ancestors(table: pa.Table, artifact_sha256: str) -> list[dict[str, Any]]:
    """Rows of every artifact that ``artifact_sha256`` derives from, nearest first (breadth-first).

    Artifacts are identified by their bytes, so one sha256 can have several records: a stage that takes a file in
    unchanged (``references`` copying a ``character_images`` render) records the same bytes with the earlier
    record's sha as parent. Every record of a sha is followed, so such a copy does not end the walk."""
    by_sha: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        by_sha.setdefault(row["artifact_sha256"], []).append(row)

    def parents(sha: str) -> list[str]:
        return [p for row in by_sha.get(sha, []) for p in row["parent_sha256s"] or [] if p != sha]

    found: list[dict[str, Any]] = []
    seen = {artifact_sha256}
    frontier = parents(artifact_sha256)
    while frontier:
        sha = frontier.pop(0)
        if sha in seen:
            continue
        seen.add(sha)
        rows = by_sha.get(sha)
        if rows is None:
            found.append({"artifact_sha256": sha, "asset_key": None, "artifact_uri": None})
            continue
        found.extend(rows)
        frontier.extend(parents(sha))
    return found
