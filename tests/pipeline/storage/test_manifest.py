"""Stage manifests store artifact paths relative to themselves inside a pair folder and read them back absolute."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import CastloraError
from pipeline.storage.manifest import read_manifest, write_manifest
from pipeline.storage.paths import PAIR_SPEC_FILE


def _frame(pair: Path, outside: Path) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [str(pair / "bank" / "0.png"), str(pair / "bank" / "1.png")],
            "reference_path": [str(pair / "references" / "a.png"), None],
            "mask_paths": [[str(pair / "bank" / "m0.png"), str(pair / "bank" / "m1.png")], []],
            "source_path": [str(outside), str(outside)],
            "note": ["../not/a/path", "x"],
        }
    )


def test_paths_inside_the_pair_are_stored_relative_and_read_back_absolute(tmp_path):
    pair = tmp_path / "home" / "pairs" / "a__b"
    pair.mkdir(parents=True)
    (pair / PAIR_SPEC_FILE).write_text("{}")
    outside = tmp_path / "photos" / "a.jpg"
    frame = _frame(pair, outside)
    write_manifest(frame, pair / "bank")

    raw = pd.read_parquet(pair / "bank" / "manifest.parquet")
    assert list(raw["path"]) == ["0.png", "1.png"]
    assert raw["reference_path"].iloc[0] == "../references/a.png" and pd.isna(raw["reference_path"].iloc[1])
    assert list(raw["mask_paths"].iloc[0]) == ["m0.png", "m1.png"]
    assert set(raw["source_path"]) == {str(outside)}  # outside the pair folder: kept absolute
    assert list(raw["note"]) == ["../not/a/path", "x"]  # not a path column: untouched

    moved = tmp_path / "moved" / "a__b"
    shutil.move(pair, moved)
    back = read_manifest(moved / "bank", "bank")
    assert list(back["path"]) == [str(moved / "bank" / "0.png"), str(moved / "bank" / "1.png")]
    assert back["reference_path"].iloc[0] == str(moved / "references" / "a.png")
    assert back["mask_paths"].iloc[0] == [str(moved / "bank" / "m0.png"), str(moved / "bank" / "m1.png")]
    assert list(back["mask_paths"].iloc[1]) == []
    assert set(back["source_path"]) == {str(outside)}


def test_outside_a_registered_pair_paths_stay_absolute(tmp_path, monkeypatch):
    """No pair.json above the folder (a notebook run): absolute paths as given; a relative one (meaning the
    working directory) is made absolute, so reading it back never resolves it against the manifest's folder."""
    frame = _frame(tmp_path / "somewhere", tmp_path / "photos" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    frame.loc[1, "path"] = "relative/1.png"
    write_manifest(frame, tmp_path / "out")
    raw = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert list(raw["path"]) == [frame["path"][0], str(tmp_path / "relative" / "1.png")]
    assert read_manifest(tmp_path / "out", "out")["path"].tolist() == list(raw["path"])


def test_missing_manifest_names_the_asset(tmp_path):
    with pytest.raises(CastloraError, match="materialize the 'segments' asset"):
        read_manifest(tmp_path, "segments")
