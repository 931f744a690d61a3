import duckdb
import pandas as pd

from pipeline.storage.lineage import LINEAGE_SCHEMA, LineageRecorder, ancestors, read_lineage


def _write(tmp_path, asset, rows, run="r1"):
    recorder = LineageRecorder(tmp_path, run, asset, "a__b", "v1")
    for sha, parents in rows:
        recorder.record(f"/x/{sha}.png", sha, parents, {"k": 1}, ["model/x"])
    return recorder.flush()


def test_pandas_and_duckdb_read_the_folder_as_is(tmp_path):
    _write(tmp_path, "references", [("r1", ["src1"]), ("r2", ["src2"])])
    _write(tmp_path, "segments", [("m1", ["r1"]), ("c1", ["r1", "m1"])])
    frame = pd.read_parquet(tmp_path)
    assert len(frame) == 4
    assert list(frame.columns) == LINEAGE_SCHEMA.names
    count = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/**/*.parquet')").fetchall()[0][0]
    assert count == 4
    assert str(frame["started_at"].dt.tz) == "UTC"


def test_ancestors_walk_back_to_sources(tmp_path):
    _write(tmp_path, "references", [("r1", ["src1"]), ("r2", ["src2"])])
    _write(tmp_path, "segments", [("c1", ["r1"]), ("c2", ["r2"])])
    _write(tmp_path, "segmix_bank", [("mix", ["c1", "c2"])])
    chain = ancestors(read_lineage(tmp_path), "mix")
    shas = [row["artifact_sha256"] for row in chain]
    assert shas[:2] == ["c1", "c2"]
    assert {"r1", "r2", "src1", "src2"} <= set(shas)
    unknown = [row for row in chain if row["asset_key"] is None]
    assert {row["artifact_sha256"] for row in unknown} == {"src1", "src2"}


def test_a_file_taken_in_unchanged_does_not_end_the_walk(tmp_path):
    """references records a character_images render with the same bytes (same sha) and that sha as parent."""
    _write(tmp_path, "character_images", [("img", ["lora"])])
    _write(tmp_path, "references", [("img", ["img"])])
    _write(tmp_path, "segments", [("cut", ["img"])])
    chain = ancestors(read_lineage(tmp_path), "cut")
    assert [(row["artifact_sha256"], row["asset_key"]) for row in chain] == [
        ("img", "character_images"),
        ("img", "references"),
        ("lora", None),
    ]


def test_empty_recorder_writes_nothing(tmp_path):
    assert LineageRecorder(tmp_path, "r", "a", "p", "v").flush() is None
    assert read_lineage(tmp_path).num_rows == 0


def test_artifacts_in_the_data_home_are_recorded_relative_to_it(tmp_path):
    home = tmp_path / "home"
    recorder = LineageRecorder(home / "lineage", "r", "segments", "a__b", "v", home=home)
    recorder.record(home / "pairs" / "a__b" / "segments" / "m.png", "m1")
    recorder.record(tmp_path / "photos" / "p.jpg", "p1")
    frame = read_lineage(recorder.root if recorder.flush() else tmp_path).to_pandas()
    assert list(frame["artifact_uri"]) == ["pairs/a__b/segments/m.png", str(tmp_path / "photos" / "p.jpg")]
