"""Import a dataset folder in MuDI's layout as a castlora pair folder (``pair.yaml`` + photos, masks, captions).

MuDI's layout (its ``dataset/category/<a>_and_<b>/``): the photos, the masks (grayscale, >128 = subject) and a
``metadata.jsonl`` whose first line maps character ids to token phrases, ``{"id": {"a": "olis corgi", ...}}``,
followed by one line per photo, ``{"id": "a", "file_name": "a00.jpg", "mask_path": "mask_a00.jpg",
"text": "A photo of a olis corgi ..."}``. The token phrase is the rare token followed by the class noun, so the
class noun is the phrase without its first word unless given. Files are copied, never moved; the result is an
ordinary pair folder that ``castlora register`` (or the inbox) takes: masks become user masks and ``text``
becomes the user caption of its photo.
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import SpecError
from pipeline.storage.paths import validate_key

METADATA_FILE = "metadata.jsonl"


@dataclass
class _Character:
    id: str
    token_phrase: str
    class_noun: str
    photos: list[dict[str, Any]] = field(default_factory=list)


def mudi_pair_key(folder_name: str) -> str:
    """``dog6_and_dog2`` -> ``dog6__dog2`` (MuDI joins the two subjects with ``_and_``)."""
    return re.sub(r"[^a-z0-9_-]", "-", folder_name.lower().replace("_and_", "__"))


def _read_metadata(path: Path) -> tuple[dict[str, str], list[tuple[int, dict[str, Any]]]]:
    if not path.is_file():
        raise SpecError(f"{path} does not exist: a MuDI dataset folder holds its photo list in {METADATA_FILE}.")
    phrases: dict[str, str] | None = None
    entries: list[tuple[int, dict[str, Any]]] = []
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as exc:
        raise SpecError(f"{path} cannot be read: {exc.strerror or exc}.") from None
    # Bytes split and decoded line by line, so an encoding error names its line.
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(
                f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                "save the file as UTF-8."
            ) from None
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path}:{number}: not valid JSON ({exc.msg}).") from exc
        if not isinstance(entry, dict):
            raise SpecError(f"{path}:{number}: expected a JSON object, got {type(entry).__name__}.")
        if isinstance(entry.get("id"), dict):
            phrases = {str(k): str(v).strip() for k, v in entry["id"].items()}
        else:
            entries.append((number, entry))
    if not phrases:
        raise SpecError(
            f'{path}: no line maps character ids to token phrases, e.g. {{"id": {{"a": "olis corgi", "b": '
            '"hta chow chow"}}}} (MuDI writes it first).'
        )
    return phrases, entries


def _characters(path: Path, phrases: dict[str, str], class_nouns: dict[str, str]) -> dict[str, _Character]:
    characters = {}
    for cid, phrase in phrases.items():
        try:
            validate_key(cid, "character id")
        except ValueError as exc:
            raise SpecError(f"{path}: {exc}") from exc
        noun = class_nouns.get(cid) or (phrase.split(maxsplit=1)[1] if len(phrase.split()) > 1 else "")
        if not noun:
            raise SpecError(
                f"{path}: the token phrase {phrase!r} of {cid!r} has no class noun after its rare token; give one "
                f"with --class-noun {cid}=<noun>."
            )
        characters[cid] = _Character(cid, phrase, noun)
    unknown = set(class_nouns) - set(characters)
    if unknown:
        raise SpecError(
            f"--class-noun names {sorted(unknown)}, which {path} does not list (ids: {sorted(characters)})."
        )
    return characters


def import_mudi(
    source: Path, destination: Path, pair_key: str | None = None, class_nouns: dict[str, str] | None = None
) -> Path:
    """Write a castlora pair folder at ``destination`` from the MuDI dataset folder ``source``; returns the
    ``pair.yaml`` written. ``destination`` must not exist yet or be empty (nothing is overwritten)."""
    source, destination = Path(source), Path(destination)
    metadata = source / METADATA_FILE
    phrases, entries = _read_metadata(metadata)
    characters = _characters(metadata, phrases, class_nouns or {})
    key = pair_key or mudi_pair_key(source.name)
    try:
        validate_key(key)
    except ValueError as exc:
        raise SpecError(f"{exc} (derived from the folder name {source.name!r}); give one with --pair.") from exc
    stems: dict[tuple[str, str], tuple[str, int]] = {}  # (character, photo stem) -> (file name, line)
    for number, entry in entries:
        where = f"{metadata}:{number}"
        cid = entry.get("id")
        if cid not in characters:
            raise SpecError(f"{where}: id {cid!r} is not one of the characters {sorted(characters)}.")
        for field_name in ("file_name", "mask_path"):  # the photo, and its optional mask
            value = entry.get(field_name)
            if value is None and field_name == "mask_path":
                continue
            if not isinstance(value, str) or not value or Path(value).name != value:
                raise SpecError(f"{where}: {field_name!r} must name a file in {source}, got {value!r}.")
            if not (source / value).is_file():
                raise SpecError(f"{where}: {field_name} {value!r} does not exist in {source}.")
        _check_stem(where, entry["file_name"], cid, stems, number)
        _check_text(where, entry.get("text"), characters[cid])
        characters[cid].photos.append(entry)
    empty = [cid for cid, c in characters.items() if not c.photos]
    if empty:
        raise SpecError(f"{metadata}: no photo lines for character(s) {empty}.")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise SpecError(f"{destination} already exists and is not an empty folder; choose a new destination.")
    # Written beside the destination and renamed into place: an interrupted import leaves no half folder.
    staging = destination.with_name(f".{destination.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_pair_folder(source, staging, key, characters)
        if destination.exists():
            destination.rmdir()
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination / "pair.yaml"


def _check_stem(
    where: str, file_name: str, cid: str, stems: dict[tuple[str, str], tuple[str, int]], number: int
) -> None:
    """Captions and masks are matched to a photo by its stem: two photos of one character sharing a stem
    (``a00.jpg`` and ``a00.png``) would share one caption and one mask."""
    stem = Path(file_name).stem
    if (cid, stem) in stems:
        other, other_line = stems[cid, stem]
        raise SpecError(
            f"{where}: {file_name!r} and {other!r} (line {other_line}) of character {cid!r} share the name "
            f"{stem!r}; captions and masks are matched to photos by name without extension, so rename one."
        )
    stems[cid, stem] = (file_name, number)


def _check_text(where: str, text: Any, character: _Character) -> None:
    """A ``text`` becomes the photo's user caption, which must name the character by its token phrase (the same
    rule the captions stage applies: case and spacing aside)."""
    if text is None:
        return
    if not isinstance(text, str):
        raise SpecError(f"{where}: 'text' must be a string, got {type(text).__name__}.")
    words = " ".join(text.split()).lower()
    if words and " ".join(character.token_phrase.split()).lower() not in words:
        raise SpecError(
            f"{where}: 'text' does not contain the token phrase {character.token_phrase!r} of character "
            f"{character.id!r}; it becomes the photo's caption, which must name the character by that phrase."
        )


def _write_pair_folder(source: Path, destination: Path, key: str, characters: dict[str, _Character]) -> None:
    spec_characters = []
    for character in characters.values():
        entry_fields: dict[str, Any] = {
            "id": character.id,
            "class_noun": character.class_noun,
            "token_phrase": character.token_phrase,
            "photos": character.id,
        }
        for entry in character.photos:
            stem = Path(entry["file_name"]).stem
            _copy(source / entry["file_name"], destination / character.id / entry["file_name"])
            if entry.get("mask_path"):
                mask = source / entry["mask_path"]
                _copy(mask, destination / f"{character.id}_masks" / f"{stem}{mask.suffix}")
                entry_fields["masks"] = f"{character.id}_masks"
            if str(entry.get("text") or "").strip():
                caption = destination / f"{character.id}_captions" / f"{stem}.txt"
                caption.parent.mkdir(parents=True, exist_ok=True)
                caption.write_text(str(entry["text"]).strip() + "\n", encoding="utf-8")
                entry_fields["captions"] = f"{character.id}_captions"
        spec_characters.append(entry_fields)
    header = f"# Imported from the MuDI dataset folder {source.resolve()} by castlora import-mudi.\n"
    body = yaml.safe_dump({"pair": key, "characters": spec_characters}, sort_keys=False)
    (destination / "pair.yaml").write_text(header + body)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
