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
from pipeline.mudi_import import import_mudi, mudi_pair_key
from pipeline.segment.user_masks import find_user_mask
from pipeline.spec import load_spec
from pipeline.stages.captions import USER_BACKEND, run_captions, user_caption_files
from pipeline.stages.references import run_references
from pipeline.storage.lineage import LineageRecorder
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
    references = run_references(
        spec=spec, out_dir=tmp_path / "refs", config=IntakeConfig(min_side=128), recorder=recorder
    ).manifest
    out = run_captions(
        references=references, out_dir=tmp_path / "caps", captioner=TemplateCaptioner(),
        cache=CaptionCache(tmp_path / "c"), recorder=recorder, user_captions=user,
    )  # fmt: skip
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
    references = run_references(
        spec=spec, out_dir=tmp_path / "refs", config=IntakeConfig(min_side=128), recorder=recorder
    ).manifest
    with pytest.raises(CastloraError, match=r"a01\.txt does not contain the token phrase 'olis corgi'"):
        run_captions(
            references=references, out_dir=tmp_path / "caps", captioner=TemplateCaptioner(),
            cache=CaptionCache(tmp_path / "c"), recorder=recorder, user_captions=user_caption_files(spec),
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


def _rewrite_line(folder: Path, number: int, **changes) -> None:
    """Change fields of line ``number`` (1-based) of metadata.jsonl."""
    path = folder / "metadata.jsonl"
    lines = path.read_text().splitlines()
    lines[number - 1] = json.dumps({**json.loads(lines[number - 1]), **changes})
    path.write_text("\n".join(lines) + "\n")


def _same_stem(folder: Path) -> None:
    (folder / "a00.png").write_bytes((folder / "a00.jpg").read_bytes())
    with (folder / "metadata.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "a", "file_name": "a00.png", "text": _text("a", 0)}) + "\n")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_same_stem, r"metadata\.jsonl:8: 'a00\.png' and 'a00\.jpg' \(line 2\) of character 'a' share the name 'a00'"),
        (
            lambda f: _rewrite_line(f, 3, text="A photo of a corgi on the grass."),
            r"metadata\.jsonl:3: 'text' does not contain the token phrase 'olis corgi' of character 'a'",
        ),
        (lambda f: _rewrite_line(f, 5, text=["not", "text"]), r"metadata\.jsonl:5: 'text' must be a string"),
    ],
    ids=["same stem", "text without the token phrase", "text not a string"],
)
def test_photos_sharing_a_name_and_captions_without_the_phrase_are_refused_at_import(tmp_path, damage, message):
    folder = mudi_folder(tmp_path)
    damage(folder)
    with pytest.raises(SpecError, match=message):
        import_mudi(folder, tmp_path / "pair")
    assert not (tmp_path / "pair").exists()


def test_token_phrase_is_found_whatever_its_case_and_spacing(tmp_path):
    folder = mudi_folder(tmp_path)
    _rewrite_line(folder, 3, text="OLIS   Corgi\tsits.")
    spec = load_spec(import_mudi(folder, tmp_path / "pair"))
    assert (Path(spec.characters[0].captions_dir) / "a01.txt").read_text().strip() == "OLIS   Corgi\tsits."


def test_metadata_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path, capsys):
    folder = mudi_folder(tmp_path)
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    lines[3] = lines[3].replace(b"number", b"n\xe9mero")  # Latin-1, as an old editor would save it
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert cli_main(["--home", str(tmp_path / "home"), "import-mudi", str(folder), str(tmp_path / "pair")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{folder / 'metadata.jsonl'}:4: not UTF-8 text (byte 0xe9" in err
    assert not (tmp_path / "pair").exists()
