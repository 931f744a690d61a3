import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import NotEnoughReferencesError
from pipeline.images import IntakeConfig, intake_photos, load_mask
from pipeline.spec import load_spec
from pipeline.stages.references import run_references
from pipeline.storage.lineage import LineageRecorder, read_lineage
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
    out = run_references(spec=spec, out_dir=tmp_path / "out", config=IntakeConfig(min_side=128), recorder=recorder)
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
        run_references(
            spec=spec,
            out_dir=tmp_path / "out",
            config=IntakeConfig(min_side=128, min_photos=3),
            recorder=_recorder(tmp_path),
        )
    message = str(info.value)
    assert "'b': 2 usable" in message and "01.jpg" in message and "'a'" not in message
    assert not (tmp_path / "out").exists()


def test_rerun_removes_files_of_dropped_photos(tmp_path, make_pair):
    folder = make_pair("a__b", photos_per_character=4)
    config = IntakeConfig(min_side=128)
    first = run_references(
        spec=load_spec(folder), out_dir=tmp_path / "out", config=config, recorder=_recorder(tmp_path)
    )
    (folder / "a" / "03.jpg").unlink()
    second = run_references(
        spec=load_spec(folder), out_dir=tmp_path / "out", config=config, recorder=_recorder(tmp_path)
    )
    on_disk = {str(p) for p in (tmp_path / "out").rglob("*.png")}
    assert len(first.manifest) == 8 and len(second.manifest) == 7
    assert on_disk == set(second.manifest["path"])


# -- every colour mode converted faithfully (or refused by name) ----------------------------------------------

_W, _H = 160, 120


def _ramp(high: float, dtype) -> np.ndarray:
    """A horizontal gradient from 0 to ``high`` with a vertical one added, so every pixel differs a little."""
    x = np.linspace(0.0, 1.0, _W)[None, :]
    y = np.linspace(0.0, 1.0, _H)[:, None]
    return ((0.8 * x + 0.2 * y) * high).astype(dtype)


def _grey(expected: np.ndarray) -> np.ndarray:
    return np.repeat(expected[..., None], 3, axis=2)


def _sixteen_bit_png(path: Path) -> np.ndarray:
    values = _ramp(65535, np.uint16)
    Image.fromarray(values).save(path)
    return _grey(np.rint(values / 257.0))


def _sixteen_bit_big_endian_tiff(path: Path) -> np.ndarray:
    values = _ramp(65535, np.uint16)
    Image.frombytes("I;16B", (_W, _H), values.astype(">u2").tobytes()).save(path)
    return _grey(np.rint(values / 257.0))


def _thirty_two_bit_tiff(path: Path) -> np.ndarray:
    values = _ramp(65535, np.int32)
    Image.fromarray(values).save(path)
    return _grey(np.rint(values / 257.0))


def _float_tiff(path: Path) -> np.ndarray:
    values = _ramp(1.0, np.float32)
    Image.fromarray(values).save(path)
    return _grey(np.rint(values * 255.0))


def _cmyk_tiff(path: Path, icc_profile: bytes | None = None) -> np.ndarray:
    cmyk = np.zeros((_H, _W, 4), np.uint8)
    cmyk[:, :40] = (255, 0, 0, 0)  # cyan
    cmyk[:, 40:80] = (0, 255, 255, 0)  # red
    cmyk[:, 80:120] = (0, 0, 0, 128)  # mid grey
    cmyk[:, 120:] = (0, 0, 0, 0)  # white
    Image.frombytes("CMYK", (_W, _H), cmyk.tobytes()).save(
        path, **({"icc_profile": icc_profile} if icc_profile else {})
    )
    expected = np.zeros((_H, _W, 3))
    expected[:, :40] = (0, 255, 255)
    expected[:, 40:80] = (255, 0, 0)
    expected[:, 80:120] = 127
    expected[:, 120:] = 255
    return expected


def _lab_tiff(path: Path) -> np.ndarray:
    # Pillow's LAB: L 0..255 for 0..100, a and b offset by 128; L=128, a=b=128 is neutral grey L*=50.
    Image.new("LAB", (_W, _H), (128, 128, 128)).save(path)
    return np.full((_H, _W, 3), 119.0)  # sRGB of L*=50


def _palette_alpha_png(path: Path) -> np.ndarray:
    indices = np.zeros((_H, _W), np.uint8)
    indices[:, _W // 2 :] = 1
    indices[: _H // 2, : _W // 4] = 2
    image = Image.frombytes("P", (_W, _H), indices.tobytes())
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (256 - 3) * 3)
    image.save(path, transparency=2)  # index 2 fully transparent
    expected = np.zeros((_H, _W, 3))
    expected[:] = (10, 20, 30)
    expected[:, _W // 2 :] = (200, 100, 50)
    expected[: _H // 2, : _W // 4] = 255  # transparent: white background
    return expected


def _la_png(path: Path) -> np.ndarray:
    grey = _ramp(255, np.uint8)
    alpha = np.full_like(grey, 255)
    alpha[:, :20] = 0
    Image.fromarray(np.stack([grey, alpha], axis=2)).save(path)
    expected = _grey(grey.astype(float))
    expected[:, :20] = 255
    return expected


def _one_bit_png(path: Path) -> np.ndarray:
    bits = np.zeros((_H, _W), bool)
    bits[::2] = True
    Image.fromarray(bits).convert("1").save(path)
    return _grey(np.where(bits, 255.0, 0.0))


MODE_CASES = {
    "16-bit greyscale PNG": ("grey16.png", _sixteen_bit_png),
    "16-bit big-endian TIFF": ("grey16b.tif", _sixteen_bit_big_endian_tiff),
    "32-bit integer TIFF": ("grey32.tif", _thirty_two_bit_tiff),
    "float TIFF": ("float.tif", _float_tiff),
    "CMYK TIFF": ("cmyk.tif", _cmyk_tiff),
    "CMYK TIFF with an unusable ICC profile": ("cmyk_icc.tif", lambda path: _cmyk_tiff(path, b"not a profile")),
    "CIELAB TIFF": ("lab.tif", _lab_tiff),
    "palette with transparency": ("palette.png", _palette_alpha_png),
    "greyscale with alpha": ("la.png", _la_png),
    "1-bit": ("bits.png", _one_bit_png),
}


@pytest.mark.parametrize("case", MODE_CASES, ids=list(MODE_CASES))
def test_every_mode_keeps_its_pixel_values(tmp_path, case):
    name, build = MODE_CASES[case]
    expected = build(tmp_path / name)
    (accepted,) = intake_photos([tmp_path / name], IntakeConfig(min_side=64)).accepted
    assert accepted.image.mode == "RGB" and accepted.image.size == (_W, _H)
    # Equal up to 8-bit quantisation: one level of rounding either way.
    difference = np.abs(np.asarray(accepted.image, dtype=float) - expected)
    assert difference.max() <= 1, f"{case}: off by up to {difference.max()} levels"


def test_sixteen_bit_mask_is_not_all_subject(tmp_path):
    values = np.zeros((_H, _W), np.uint16)
    values[:, : _W // 2] = 65535
    values[:, _W // 2 :] = 20000  # 78 in 8 bits: background, though far above 128 as a raw number
    Image.fromarray(values).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png")
    assert mask[:, : _W // 2].all() and not mask[:, _W // 2 :].any()


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("F", np.full((_H, _W), 3.5, np.float32), "mode F"),
        ("F", np.full((_H, _W), np.nan, np.float32), "mode F"),
        ("I", np.full((_H, _W), 100_000, np.int32), "mode I"),
    ],
    ids=["float beyond 0..1", "float NaN", "32-bit beyond 16-bit range"],
)
def test_modes_without_a_faithful_reading_are_refused_by_name(tmp_path, mode, values, expected):
    Image.fromarray(values).save(tmp_path / "odd.tif")
    result = intake_photos([tmp_path / "odd.tif"], IntakeConfig(min_side=64))
    assert not result.accepted
    (rejected,) = result.rejected
    assert expected in rejected.reason and "export it as 8- or 16-bit" in rejected.reason


# -- size and shape ------------------------------------------------------------------------------------------


def test_min_side_is_checked_after_downscaling(tmp_path):
    subject_photo((300, 1200), seed=7).save(tmp_path / "tall.png")  # 4:1, allowed; 1024 long side -> 256x1024
    config = IntakeConfig(min_side=260, max_side=1024)
    (rejected,) = intake_photos([tmp_path / "tall.png"], config).rejected
    assert "too small: 256x1024 after downscaling 300x1200" in rejected.reason and "260px" in rejected.reason


def test_extreme_aspect_ratios_are_refused_with_the_figure_and_the_limit(tmp_path):
    subject_photo((300, 3000), seed=8).save(tmp_path / "strip.png")
    subject_photo((1200, 300), seed=9).save(tmp_path / "wide.png")  # exactly 4:1: accepted
    result = intake_photos([tmp_path / "strip.png", tmp_path / "wide.png"], IntakeConfig())
    (rejected,) = result.rejected
    assert Path(rejected.source).name == "strip.png"
    assert "aspect ratio 10.0:1 (300x3000)" in rejected.reason and "limit of 4:1" in rejected.reason
    (accepted,) = result.accepted
    assert accepted.image.size == (1200, 300)
    loose = intake_photos([tmp_path / "strip.png"], IntakeConfig(min_side=64, max_aspect_ratio=12))
    assert loose.accepted[0].image.size == (154, 1536)
