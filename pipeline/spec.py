"""Character-pair specs: the small YAML/JSON file that says who the characters are and where their photos live.

Example ``pair.yaml`` (paths are relative to the spec file)::

    pair: dog6__dog2
    characters:
      - id: dog6
        class_noun: dog
        token_phrase: olis dog
        photos: dog6            # a folder, or a list of files / file:// URIs
        masks: dog6_masks       # optional: user masks, same file stem as the photo (MuDI layout)
        captions: dog6_captions # optional: user captions, <photo stem>.txt, containing the token phrase
      - id: dog2
        class_noun: dog
        token_phrase: vrin dog
        photos: dog2
    class_images:               # optional: prior-preservation images per class noun
      dog: class_dogs           # a folder to import; omit to generate them with the base model
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from pipeline.errors import SpecError
from pipeline.paths import validate_key

SPEC_FILENAMES = ("pair.yaml", "pair.yml", "pair.json")


@dataclass(frozen=True)
class CharacterSpec:
    id: str
    class_noun: str
    token_phrase: str
    photos: tuple[str, ...]
    """Absolute paths of the candidate reference photos (validated later by the references stage)."""
    masks_dir: str | None = None
    captions_dir: str | None = None
    """Folder of the user's own captions, ``<photo stem>.txt`` (kohya-style sidecars); they win over the
    captioning backend for the photos they cover and must contain the token phrase."""


@dataclass(frozen=True)
class PairSpec:
    pair: str
    characters: tuple[CharacterSpec, ...]
    class_images: dict[str, str] = field(default_factory=dict)
    """class noun -> absolute folder of class images to import (absent: generate with the base model)."""
    source: str | None = None

    @property
    def class_nouns(self) -> list[str]:
        return sorted({c.class_noun for c in self.characters})

    def character(self, character_id: str) -> CharacterSpec:
        for character in self.characters:
            if character.id == character_id:
                return character
        raise SpecError(f"Pair {self.pair!r} has no character {character_id!r}.")

    def to_json(self) -> str:
        raw = asdict(self)
        for character in raw["characters"]:
            if character["captions_dir"] is None:  # absent, not null: older specs keep their fingerprints
                del character["captions_dir"]
        return json.dumps(raw, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PairSpec:
        raw = json.loads(text)
        characters = tuple(CharacterSpec(**{**c, "photos": tuple(c["photos"])}) for c in raw.pop("characters"))
        return cls(characters=characters, **raw)


def find_spec_file(folder: Path) -> Path | None:
    for name in SPEC_FILENAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_spec(path: str | Path, pair_key: str | None = None, confine: bool = False) -> PairSpec:
    """Read and validate a spec file (or a folder holding ``pair.yaml``), resolving paths against it.

    ``pair_key`` overrides or supplies the key (the inbox folder name, for the sensor). ``confine`` keeps every
    path the spec names (photos, masks, class images) inside the spec's own folder: the sensor sets it, because
    an inbox folder may come from anyone who can write to the inbox (or its S3 prefix).
    """
    path = Path(path)
    if path.is_dir():
        found = find_spec_file(path)
        if found is None:
            raise SpecError(f"{path}: no spec file found; expected one of {', '.join(SPEC_FILENAMES)}.")
        path = found
    if not path.is_file():
        raise SpecError(f"{path}: spec file does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid YAML/JSON: {exc}") from exc
    root = path.parent.resolve() if confine else None
    return parse_spec(raw, base_dir=path.parent, source=str(path.resolve()), pair_key=pair_key, confine_to=root)


def parse_spec(
    raw: Any,
    base_dir: Path,
    source: str | None = None,
    pair_key: str | None = None,
    confine_to: Path | None = None,
) -> PairSpec:
    where = source or "pair spec"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: the top level must be a mapping with 'pair' and 'characters'.")
    key = pair_key or raw.get("pair")
    if not key:
        raise SpecError(f"{where}: field 'pair' is missing (the pair key, e.g. 'dog6__dog2').")
    try:
        validate_key(str(key))
    except ValueError as exc:
        raise SpecError(f"{where}: field 'pair': {exc}") from exc
    if pair_key and raw.get("pair") and raw["pair"] != pair_key:
        raise SpecError(
            f"{where}: field 'pair' is {raw['pair']!r} but the folder is named {pair_key!r}; make them match."
        )

    entries = raw.get("characters")
    if not isinstance(entries, list) or len(entries) < 2:
        raise SpecError(f"{where}: field 'characters' must list at least two characters.")
    characters = tuple(_parse_character(entry, i, base_dir, where, confine_to) for i, entry in enumerate(entries))
    ids = [c.id for c in characters]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{where}: character ids must be unique, got {ids}.")
    phrases = [c.token_phrase for c in characters]
    if len(set(phrases)) != len(phrases):
        raise SpecError(f"{where}: token phrases must differ between characters, got {phrases}.")

    class_images = {
        str(noun): _existing_folder(folder, base_dir, f"{where}: class_images.{noun}", confine_to)
        for noun, folder in (raw.get("class_images") or {}).items()
    }
    return PairSpec(pair=str(key), characters=characters, class_images=class_images, source=source)


def _parse_character(entry: Any, index: int, base_dir: Path, where: str, confine_to: Path | None) -> CharacterSpec:
    field_at = f"{where}: characters[{index}]"
    if not isinstance(entry, dict):
        raise SpecError(f"{field_at} must be a mapping with id, class_noun, token_phrase, photos.")
    for name in ("id", "class_noun", "token_phrase", "photos"):
        if not entry.get(name):
            raise SpecError(f"{field_at}: field {name!r} is missing or empty.")
    try:
        character_id = validate_key(str(entry["id"]), "character id")
    except ValueError as exc:
        raise SpecError(f"{field_at}.id: {exc}") from exc
    photos = _collect_photos(entry["photos"], base_dir, f"{field_at}.photos", confine_to)
    return CharacterSpec(
        id=character_id,
        class_noun=str(entry["class_noun"]).strip(),
        token_phrase=str(entry["token_phrase"]).strip(),
        photos=photos,
        masks_dir=_optional_folder(entry, "masks", base_dir, field_at, confine_to),
        captions_dir=_optional_folder(entry, "captions", base_dir, field_at, confine_to),
    )


def _optional_folder(entry: dict, name: str, base_dir: Path, field_at: str, confine_to: Path | None) -> str | None:
    """The folder an optional field names (masks, captions), which must exist; None when the field is absent."""
    return _existing_folder(entry[name], base_dir, f"{field_at}.{name}", confine_to) if entry.get(name) else None


def _existing_folder(value: Any, base_dir: Path, field: str, confine_to: Path | None) -> str:
    folder = _resolve(value, base_dir, field, confine_to)
    if not folder.is_dir():
        raise SpecError(f"{field}: folder {folder} does not exist.")
    return str(folder)


def _resolve(value: Any, base_dir: Path, field_at: str, confine_to: Path | None = None) -> Path:
    text = str(value)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        resolved = Path(unquote(parsed.path)).resolve()
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise SpecError(f"{field_at}: URI scheme {parsed.scheme!r} is not supported; use a path or file:// URI.")
    else:
        path = Path(text).expanduser()
        # resolve() follows symlinks too, so a link inside the folder that points outside is caught below.
        resolved = (path if path.is_absolute() else base_dir / path).resolve()
    if confine_to is not None and resolved != confine_to and confine_to not in resolved.parents:
        raise SpecError(
            f"{field_at}: {text!r} points outside the pair folder {confine_to}; inbox specs may only name files "
            "inside their own folder."
        )
    return resolved


def _collect_photos(value: Any, base_dir: Path, field_at: str, confine_to: Path | None) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    photos: list[str] = []
    for item in items:
        path = _resolve(item, base_dir, field_at, confine_to)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if confine_to is not None:
                # A symlinked file inside a confined folder must not reach outside it either.
                found = [_resolve(p, path, field_at, confine_to) for p in found]
            photos.extend(str(p) for p in found)
        elif path.is_file():
            photos.append(str(path))
        else:
            raise SpecError(f"{field_at}: {path} does not exist.")
    if not photos:
        raise SpecError(f"{field_at}: no files found.")
    return tuple(photos)
