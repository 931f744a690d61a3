import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import NotEnoughReferencesError
from pipeline.images import IntakeConfig, intake_photos
from pipeline.lineage import LineageRecorder, read_lineage
from pipeline.spec import load_spec
from pipeline.stages.references import run_references
from tests.conftest import subject_photo


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_bad_photos_are_listed_with_reasons(tmp_path):
    good = subject_photo((320, 256), seed=1)
    good.save(tmp_path / "good.jpg")
    Image.open(tmp_path / "good.jpg").save(tmp_path / "same_pixels.png")  # same pixels, other format
    (tmp_path / "corrupt.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:300])
    subject_photo((100, 90), seed=2).save(tmp_path / "tiny.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    subject_photo((320, 256), seed=3).convert("RGBA").save(tmp_path / "rgba.png")
    subject_photo((320, 256), seed=4).convert("L").save(tmp_path / "gray.png")
    files = ["good.jpg", "same_pixels.png", "corrupt.jpg", "tiny.jpg", "notes.txt", "missing.jpg"]
    files += ["rgba.png", "gray.png"]

    result = intake_photos([tmp_path / f for f in files], IntakeConfig(min_side=128))

    reasons = {Path(r.source).name: r.reason for r in result.rejected}
    assert set(reasons) == {"same_pixels.png", "corrupt.jpg", "tiny.jpg", "notes.txt", "missing.jpg"}
    assert reasons["same_pixels.png"].startswith("duplicate of") and "good.jpg" in reasons["same_pixels.png"]
    assert "corrupt" in reasons["corrupt.jpg"] or "truncated" in reasons["corrupt.jpg"]
    assert "too small" in reasons["tiny.jpg"] and "128" in reasons["tiny.jpg"]
    assert "not a readable image" in reasons["notes.txt"]
    assert "cannot read" in reasons["missing.jpg"]
    accepted = {Path(a.source).name: a for a in result.accepted}
    assert set(accepted) == {"good.jpg", "rgba.png", "gray.png"}
    assert all(a.image.mode == "RGB" for a in result.accepted)


def test_exif_orientation_is_applied(tmp_path):
    wide = subject_photo((400, 300), seed=5)
    (tmp_path / "rotated.jpg").write_bytes(_jpeg_with_orientation(wide, 6))  # 6: rotate 90° clockwise
    (accepted,) = intake_photos([tmp_path / "rotated.jpg"], IntakeConfig(min_side=64)).accepted
    assert accepted.image.size == (300, 400)
    assert accepted.original_size == (400, 300)


def test_large_photos_are_downscaled(tmp_path):
    subject_photo((900, 600), seed=6).save(tmp_path / "big.png")
    (accepted,) = intake_photos([tmp_path / "big.png"], IntakeConfig(max_side=450)).accepted
    assert accepted.image.size == (450, 300)


def _recorder(tmp_path: Path, asset: str = "references") -> LineageRecorder:
    return LineageRecorder(tmp_path / "lineage", "run1", asset, "a__b", "test")


def test_stage_writes_manifest_and_lineage(tmp_path, make_pair):
    spec = load_spec(make_pair("a__b"))
    recorder = _recorder(tmp_path)
    out = run_references(spec, tmp_path / "out", IntakeConfig(min_side=128), recorder)
    recorder.flush()

    assert out.manifest.groupby("character_id").size().to_dict() == {"a": 3, "b": 3}
    assert pd.read_parquet(out.manifest_path).equals(out.manifest)
    lineage = read_lineage(tmp_path / "lineage").to_pandas()
    assert set(lineage["artifact_sha256"]) == set(out.manifest["sha256"])
    row = lineage.iloc[0]
    assert list(row["parent_sha256s"]) == [
        out.manifest.set_index("sha256").loc[row["artifact_sha256"], "source_sha256"]
    ]


def test_too_few_photos_fails_naming_files_and_writes_nothing(tmp_path, make_pair):
    folder = make_pair("a__b")
    (folder / "b" / "01.jpg").write_bytes(b"garbage")
    spec = load_spec(folder)
    with pytest.raises(NotEnoughReferencesError) as info:
        run_references(spec, tmp_path / "out", IntakeConfig(min_side=128, min_photos=3), _recorder(tmp_path))
    message = str(info.value)
    assert "'b': 2 usable" in message and "01.jpg" in message and "'a'" not in message
    assert not (tmp_path / "out").exists()


def test_rerun_removes_files_of_dropped_photos(tmp_path, make_pair):
    folder = make_pair("a__b", photos_per_character=4)
    config = IntakeConfig(min_side=128)
    first = run_references(load_spec(folder), tmp_path / "out", config, _recorder(tmp_path))
    (folder / "a" / "03.jpg").unlink()
    second = run_references(load_spec(folder), tmp_path / "out", config, _recorder(tmp_path))
    on_disk = {str(p) for p in (tmp_path / "out").rglob("*.png")}
    assert len(first.manifest) == 8 and len(second.manifest) == 7
    assert on_disk == set(second.manifest["path"])
