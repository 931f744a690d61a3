"""A dataset folder in MuDI's layout (photos, masks, metadata.jsonl) becomes a castlora pair folder whose masks
are user masks and whose metadata texts are user captions."""

import json
from pathlib import Path

import numpy as np
import pytest

from assets.cli import main as cli_main
from pipeline.captions import CaptionCache, TemplateCaptioner
from pipeline.errors import CastloraError, SpecError
from pipeline.images import IntakeConfig, mask_to_image
from pipeline.lineage import LineageRecorder
from pipeline.mudi_import import import_mudi, mudi_pair_key
from pipeline.segment.user_masks import find_user_mask
from pipeline.spec import load_spec
from pipeline.stages.captions import USER_BACKEND, run_captions, user_caption_files
from pipeline.stages.references import run_references
from tests.conftest import subject_photo

PHRASES = {"a": "olis corgi", "b": "hta chow chow"}


def _text(cid: str, n: int) -> str:
    return f"A photo of a {PHRASES[cid]} number {n} on a plain background."


def mudi_folder(root: Path, name: str = "dog6_and_dog2", captions: bool = True) -> Path:
    """A folder as MuDI ships one: a00.jpg, mask_a00.jpg, ..., metadata.jsonl (id map first)."""
    folder = root / name
    folder.mkdir(parents=True)
    lines = [json.dumps({"id": PHRASES})]
    for index, cid in enumerate(PHRASES):
        for n in range(3):
            stem = f"{cid}{n:02d}"
            subject_photo((320, 256), seed=10 * index + n, colour=(40 + 90 * index, 60 + 30 * n, 90)).save(
                folder / f"{stem}.jpg", quality=92
            )
            mask = np.zeros((256, 320), dtype=bool)
            mask[50:210, 70:250] = True
            mask_to_image(mask).save(folder / f"mask_{stem}.jpg")
            entry = {"id": cid, "file_name": f"{stem}.jpg", "mask_path": f"mask_{stem}.jpg"}
            if captions:
                entry["text"] = _text(cid, n)
            lines.append(json.dumps(entry))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_import_writes_a_pair_folder_with_user_masks_and_captions(tmp_path):
    spec_file = import_mudi(mudi_folder(tmp_path), tmp_path / "pair")
    spec = load_spec(spec_file)
    assert spec.pair == "dog6__dog2"
    assert [(c.id, c.token_phrase, c.class_noun) for c in spec.characters] == [
        ("a", "olis corgi", "corgi"),
        ("b", "hta chow chow", "chow chow"),
    ]
    for character in spec.characters:
        assert [Path(p).name for p in character.photos] == [f"{character.id}{n:02d}.jpg" for n in range(3)]
        for photo in character.photos:
            mask = find_user_mask(Path(character.masks_dir), Path(photo))
            assert mask is not None and mask.parent.name == f"{character.id}_masks" and mask.stem == Path(photo).stem
    captions = {path.read_text().strip() for path in user_caption_files(spec).values()}
    assert captions == {_text(cid, n) for cid in PHRASES for n in range(3)}


def test_captions_stage_keeps_user_captions_and_captions_the_rest(tmp_path):
    spec = load_spec(import_mudi(mudi_folder(tmp_path), tmp_path / "pair"))
    (Path(spec.characters[1].captions_dir) / "b02.txt").unlink()  # one photo without a user caption
    user = user_caption_files(spec)
    recorder = LineageRecorder(tmp_path / "lineage", "run", "captions", "dog6__dog2", "test")
    references = run_references(spec, tmp_path / "refs", IntakeConfig(min_side=128), recorder).manifest
    out = run_captions(references, tmp_path / "caps", TemplateCaptioner(), CaptionCache(tmp_path / "c"), recorder, user)
    by_photo = dict(zip(references["source"].map(lambda p: Path(p).stem), out["caption"], strict=True))
    backends = dict(zip(references["source"].map(lambda p: Path(p).stem), out["backend"], strict=True))
    assert by_photo["a00"] == _text("a", 0) and backends["a00"] == USER_BACKEND
    assert backends["b02"] != USER_BACKEND and "hta chow chow" in by_photo["b02"]
    assert sum(b == USER_BACKEND for b in backends.values()) == 5


def test_user_caption_without_the_token_phrase_is_refused_naming_the_file(tmp_path):
    spec = load_spec(import_mudi(mudi_folder(tmp_path), tmp_path / "pair"))
    bad = Path(spec.characters[0].captions_dir) / "a01.txt"
    bad.write_text("A photo of a corgi.")
    recorder = LineageRecorder(tmp_path / "lineage", "run", "captions", "dog6__dog2", "test")
    references = run_references(spec, tmp_path / "refs", IntakeConfig(min_side=128), recorder).manifest
    with pytest.raises(CastloraError, match=r"a01\.txt does not contain the token phrase 'olis corgi'"):
        run_captions(
            references, tmp_path / "caps", TemplateCaptioner(), CaptionCache(tmp_path / "c"), recorder,
            user_caption_files(spec),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "metadata.jsonl").write_text('{"id": {"a": "olis corgi"}}\n{"id": "a", oops}\n'), r":2: not"),
        (lambda f: (f / "metadata.jsonl").unlink(), "metadata.jsonl does not exist"),
        (lambda f: (f / "b01.jpg").unlink(), "file_name 'b01.jpg' does not exist"),
        (lambda f: (f / "mask_a00.jpg").unlink(), "mask_path 'mask_a00.jpg' does not exist"),
        (
            lambda f: (f / "metadata.jsonl").write_text('{"id": "a", "file_name": "a00.jpg"}\n'),
            "no line maps character ids to token phrases",
        ),
        (
            lambda f: (f / "metadata.jsonl").write_text(
                '{"id": {"a": "olis", "b": "hta chow chow"}}\n{"id": "a", "file_name": "a00.jpg"}\n'
                '{"id": "b", "file_name": "b00.jpg"}\n'
            ),
            "--class-noun a=<noun>",
        ),
        (
            lambda f: (f / "metadata.jsonl").write_text(
                '{"id": {"a": "olis corgi", "b": "hta chow chow"}}\n{"id": "c", "file_name": "a00.jpg"}\n'
            ),
            "id 'c' is not one of the characters",
        ),
    ],
)
def test_bad_metadata_is_named(tmp_path, damage, message):
    folder = mudi_folder(tmp_path)
    damage(folder)
    with pytest.raises(SpecError, match=message):
        import_mudi(folder, tmp_path / "pair")
    assert not (tmp_path / "pair").exists()  # nothing half-written


def test_destination_is_never_overwritten_and_nouns_and_key_can_be_given(tmp_path):
    folder = mudi_folder(tmp_path, name="_odd")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SpecError, match="already exists"):
        import_mudi(folder, tmp_path / "taken", pair_key="x__y")
    with pytest.raises(SpecError, match="give one with --pair"):
        import_mudi(folder, tmp_path / "pair")
    spec = load_spec(import_mudi(folder, tmp_path / "pair", "x__y", {"b": "dog"}))
    assert spec.pair == "x__y" and [c.class_noun for c in spec.characters] == ["corgi", "dog"]
    assert mudi_pair_key("cat2_and_pet_dog1") == "cat2__pet_dog1"


def test_cli_import_then_register(tmp_path, capsys):
    folder = mudi_folder(tmp_path, captions=False)
    code = cli_main(["--home", str(tmp_path / "home"), "import-mudi", str(folder), str(tmp_path / "pair"),
                     "--class-noun", "a=dog"])  # fmt: skip
    assert code == 0 and "castlora register" in capsys.readouterr().out
    spec = load_spec(tmp_path / "pair")
    assert spec.characters[0].class_noun == "dog" and spec.characters[0].captions_dir is None
    assert cli_main(["import-mudi", str(folder), str(tmp_path / "pair2"), "--class-noun", "a"]) == 2
    assert "use ID=NOUN" in capsys.readouterr().err
