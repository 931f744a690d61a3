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
        relative_size: "2"      # optional: height relative to the others (unset: 1), kept in Seg-Mix composites
      - id: dog2
        class_noun: dog
        token_phrase: vrin dog
        photos: dog2
      - id: cat1                # modular customization: an existing LoRA instead of (or besides) photos
        class_noun: cat
        token_phrase: sks cat
        lora: cat1.safetensors  # diffusers/PEFT or kohya file for the pair's base model
        lora_scale: '0.8'       # optional, default 1 (quoted: every value is text)
    class_images:               # optional: prior-preservation images per class noun
      dog: class_dogs           # a folder to import; omit to generate them with the base model

Every value is text (YAML reads unquoted ``010`` as 8, so numbers must be quoted), unknown fields are errors,
aliases are refused, and relative paths (and relative ``file:`` URIs) are relative to the spec's folder.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from pipeline.errors import CastloraError, ConfinementError, SpecError
from pipeline.storage.hashing import sha256_file
from pipeline.storage.paths import confined_path, is_within, validate_key

SPEC_FILENAMES = ("pair.yaml", "pair.yml", "pair.json")
TOP_FIELDS = ("pair", "characters", "class_images")
CHARACTER_FIELDS = (
    "id",
    "class_noun",
    "token_phrase",
    "photos",
    "masks",
    "captions",
    "relative_size",
    "lora",
    "lora_scale",
)
MAX_SPEC_BYTES = 1 << 20
"""A pair spec is a few hundred bytes; anything over 1 MiB is not one (and is not read into memory)."""
MAX_ERROR_CHARS = 2000
"""Spec errors end up in sensor skip reasons and the UI: a hostile spec must not make them huge."""
_FS_ERRORS = (OSError, RuntimeError, ValueError)
"""What path operations raise on link loops (RuntimeError before Python 3.13), over-long names, NUL bytes."""


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
    relative_size: float | None = None
    """Height relative to the other characters (dog 2, toy 1: the dog twice the toy's height) in the Seg-Mix
    composites and MuDI's auto layouts; None: not set (1 when another character sets one)."""
    lora: str | None = None
    """Absolute path of the character's own LoRA file (modular customization, docs/design.md#modular-customization);
    ``photos`` may then be empty: the ``character_images`` stage renders reference images with it."""
    lora_scale: float = 1.0
    """Scale the character's LoRA is applied at (rendering its images, merging)."""


@dataclass(frozen=True)
class PairSpec:
    pair: str
    characters: tuple[CharacterSpec, ...]
    class_images: dict[str, str] = field(default_factory=dict)
    """class noun -> absolute folder of class images to import (absent: generate with the base model)."""
    source: str | None = None
    confined_to: str | None = None
    """The inbox pair folder every file must stay in (re-checked whenever the registered spec is loaded and at
    each user mask, caption or class image read); None for specs registered by hand, which may point anywhere."""

    @property
    def relative_sizes(self) -> dict[str, float] | None:
        """Seg-Mix ``relative_scale`` by character id when any character sets ``relative_size`` (the others 1),
        else None (independent sizes, as in MuDI); docs/design.md#layout-control."""
        if all(c.relative_size is None for c in self.characters):
            return None
        return {c.id: c.relative_size if c.relative_size is not None else 1.0 for c in self.characters}

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
            for name in ("captions_dir", "relative_size", "lora"):
                if character[name] is None:  # absent, not null: older specs keep their fingerprints
                    del character[name]
            if character["lora_scale"] == 1.0:
                del character["lora_scale"]
        if raw["confined_to"] is None:
            del raw["confined_to"]
        return json.dumps(raw, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PairSpec:
        raw = json.loads(text)
        characters = tuple(CharacterSpec(**{**c, "photos": tuple(c["photos"])}) for c in raw.pop("characters"))
        return cls(characters=characters, **raw)


def find_spec_file(folder: Path) -> Path | None:
    for name in SPEC_FILENAMES:
        candidate = folder / name
        if candidate.is_file() or candidate.is_symlink():
            return candidate
    return None


def load_spec(path: str | Path, pair_key: str | None = None, confine: bool = False) -> PairSpec:
    """Read and validate a spec file (or a folder holding ``pair.yaml``), resolving paths against it.

    ``pair_key`` overrides or supplies the key (the inbox folder name, for the sensor). ``confine`` keeps every
    file the spec names, and every file in the folders it names (photos, masks, captions, class images), inside
    the spec's own folder, and refuses a symlinked folder or spec file: the sensor sets it, because an inbox
    folder may come from anyone who can write to the inbox (or its S3 prefix). Every problem, including file
    system errors (link loops, over-long names, NUL bytes), is a ``SpecError`` naming the file or field.
    """
    try:
        return _load_spec(Path(path), pair_key, confine)
    except CastloraError as exc:
        if len(str(exc)) <= MAX_ERROR_CHARS:
            raise
        raise type(exc)(_capped(str(exc))) from exc
    except _FS_ERRORS as exc:
        raise SpecError(f"{_shown(str(path), 200)}: cannot be read as a pair spec ({_fs_reason(exc)}).") from exc


def _load_spec(path: Path, pair_key: str | None, confine: bool) -> PairSpec:
    if confine and path.is_symlink():
        raise ConfinementError(f"{path}: the pair folder is a symlink; copy the folder itself into the inbox.")
    if path.is_dir():
        found = find_spec_file(path)
        if found is None:
            raise SpecError(f"{path}: no spec file found; expected one of {', '.join(SPEC_FILENAMES)}.")
        path = found
    if confine and path.is_symlink():
        raise ConfinementError(f"{path}: the spec file is a symlink; put the spec file itself in the pair folder.")
    if not path.is_file():
        raise SpecError(f"{path}: spec file does not exist.")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {path.stat().st_size} bytes is too large for a pair spec (limit {MAX_SPEC_BYTES}).")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SpecLoader)  # a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid YAML/JSON: {_yaml_reason(exc)}") from exc
    root = path.parent.resolve() if confine else None
    return parse_spec(raw, base_dir=path.parent, source=str(path.resolve()), pair_key=pair_key, confine_to=root)


class _SpecLoader(yaml.SafeLoader):
    """A SafeLoader that refuses aliases (``*name``: a few hundred bytes of nested aliases expand to gigabytes)
    and keeps every unquoted non-text scalar (numbers, yes/no, dates) as ``_Unquoted``, so the error can show
    what the user typed: YAML reads ``pair: 010`` as the number 8."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a pair spec; write the value out", event.start_mark
            )
        return super().compose_node(parent, index)


@dataclass(frozen=True)
class _Unquoted:
    text: str
    kind: str


for _tag, _label in (("int", "number"), ("float", "number"), ("bool", "true/false value"), ("timestamp", "date")):
    _SpecLoader.add_constructor(
        f"tag:yaml.org,2002:{_tag}", lambda loader, node, label=_label: _Unquoted(str(node.value), label)
    )


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
    _check_fields(raw, TOP_FIELDS, where)
    key = _text(raw["pair"], f"{where}: field 'pair'") if raw.get("pair") is not None else None
    if not (pair_key or key):
        raise SpecError(f"{where}: field 'pair' is missing (the pair key, e.g. 'dog6__dog2').")
    try:
        validate_key(pair_key or key)
    except ValueError as exc:
        raise SpecError(f"{where}: field 'pair': {exc}") from exc
    if pair_key and key and key != pair_key:
        raise SpecError(f"{where}: field 'pair' is {key!r} but the folder is named {pair_key!r}; make them match.")

    entries = raw.get("characters")
    if not isinstance(entries, list) or len(entries) < 2:
        raise SpecError(f"{where}: field 'characters' must list at least two characters.")
    characters = tuple(_parse_character(entry, i, base_dir, where, confine_to) for i, entry in enumerate(entries))
    ids = [c.id for c in characters]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{where}: character ids must be unique, got {ids}.")
    _check_token_phrases(characters, where)
    _refuse_shared_photos(characters, where)

    class_images_raw = raw.get("class_images") or {}
    if not isinstance(class_images_raw, dict):
        raise SpecError(
            f"{where}: field 'class_images' must map a class noun to a folder (e.g. 'dog: class_dogs'), "
            f"got a {_kind(class_images_raw)}."
        )
    nouns = sorted({c.class_noun for c in characters})
    class_images: dict[str, str] = {}
    for noun_raw, folder in class_images_raw.items():
        noun = _text(noun_raw, f"{where}: class_images key")
        if noun not in nouns:
            hint = difflib.get_close_matches(noun, nouns, n=1)
            raise SpecError(
                f"{where}: class_images.{noun}: no character has the class noun {noun!r} "
                + (f"(did you mean {hint[0]!r}?)" if hint else f"(the class nouns are {nouns})")
            )
        class_images[noun] = _existing_folder(folder, base_dir, f"{where}: class_images.{noun}", confine_to)
    return PairSpec(
        pair=pair_key or str(key),
        characters=characters,
        class_images=class_images,
        source=source,
        confined_to=str(confine_to) if confine_to is not None else None,
    )


def check_confinement(spec: PairSpec, named_root: Path | None = None) -> PairSpec:
    """Re-check, right before the files are read, that every file of an inbox spec is still inside its pair
    folder (a photo swapped for a symlink after registration is refused here); specs without ``confined_to``
    (registered by hand) pass unchanged. ``named_root``: the pair folder as named, before links are resolved."""
    if spec.confined_to is None:
        return spec
    root = Path(spec.confined_to)
    if root.is_symlink() or (named_root is not None and named_root.is_symlink()):
        raise ConfinementError(f"The pair folder {root} is now a symlink; copy the folder itself into the inbox.")
    try:
        for character in spec.characters:
            for photo in character.photos:
                confined_path(photo, root, f"Photo of {character.id!r}")
            if character.lora:
                confined_path(character.lora, root, f"LoRA file of {character.id!r}")
            for name, folder in (("masks", character.masks_dir), ("captions", character.captions_dir)):
                if folder:
                    _confined_folder(Path(folder), root, f"{character.id!r} {name} folder")
        for noun, folder in spec.class_images.items():
            _confined_folder(Path(folder), root, f"class_images.{noun} folder")
    except CastloraError:
        raise
    except _FS_ERRORS as exc:
        raise ConfinementError(f"Pair {spec.pair!r}: a file cannot be checked ({_fs_reason(exc)}).") from exc
    return spec


def _confined_folder(folder: Path, root: Path, what: str) -> None:
    """The folder and every entry in it resolve inside ``root``."""
    confined_path(folder, root, what)
    for entry in sorted(folder.iterdir()):
        confined_path(entry, root, f"File {entry.name[:100]!r} in the {what}")


def _parse_character(entry: Any, index: int, base_dir: Path, where: str, confine_to: Path | None) -> CharacterSpec:
    field_at = f"{where}: characters[{index}]"
    if not isinstance(entry, dict):
        raise SpecError(f"{field_at} must be a mapping with id, class_noun, token_phrase, photos.")
    _check_fields(entry, CHARACTER_FIELDS, field_at)
    for name in ("id", "class_noun", "token_phrase"):
        if _absent(entry.get(name)):
            raise SpecError(f"{field_at}: field {name!r} is missing or empty.")
    character_id = _text(entry["id"], f"{field_at}.id")
    try:
        validate_key(character_id, "character id")
    except ValueError as exc:
        raise SpecError(f"{field_at}.id: {exc}") from exc
    if _absent(entry.get("photos")) and _absent(entry.get("lora")):
        raise SpecError(
            f"{field_at}: field 'photos' is missing or empty, and so is 'lora': character {character_id!r} needs "
            "'photos' (a folder or list of photos) or 'lora' (its own LoRA file for the pair's base model), or both."
        )
    photos: tuple[str, ...] = ()
    if not _absent(entry.get("photos")):
        photos = _collect_photos(entry["photos"], base_dir, f"{field_at}.photos", confine_to)
    lora = None
    if not _absent(entry.get("lora")):
        lora = _existing_lora_file(entry["lora"], base_dir, f"{field_at}.lora", confine_to)
    elif entry.get("lora_scale") is not None:
        raise SpecError(f"{field_at}.lora_scale: only meaningful with 'lora'; remove it or add the LoRA file.")
    return CharacterSpec(
        id=character_id,
        class_noun=_text(entry["class_noun"], f"{field_at}.class_noun"),
        token_phrase=_text(entry["token_phrase"], f"{field_at}.token_phrase"),
        photos=photos,
        masks_dir=_optional_folder(entry, "masks", base_dir, field_at, confine_to),
        captions_dir=_optional_folder(entry, "captions", base_dir, field_at, confine_to),
        relative_size=_optional_size(entry, field_at),
        lora=lora,
        lora_scale=_scale(entry.get("lora_scale"), f"{field_at}.lora_scale"),
    )


def _optional_size(entry: dict, field_at: str) -> float | None:
    """``relative_size``: quoted text of a finite number > 0 ("2", "0.5"); None when absent."""
    if entry.get("relative_size") is None:
        return None
    at = f"{field_at}.relative_size"
    text = _text(entry["relative_size"], at)
    try:
        value = float(text)
    except ValueError:
        raise SpecError(
            f"{at}: {_shown(text)} is not a number; give the height relative to the others, e.g. '2'."
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise SpecError(f"{at}: {_shown(text)} must be a finite number > 0 (a height relative to the others).")
    return value


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not value)


def _scale(value: Any, field_at: str) -> float:
    """A LoRA scale: quoted text holding a finite number in (0, 4] (YAML numbers are refused like everywhere)."""
    if value is None:
        return 1.0
    text = _text(value, field_at)
    try:
        scale = float(text)
    except ValueError as exc:
        raise SpecError(f"{field_at}: {_shown(text)} is not a number; write e.g. '0.8'.") from exc
    if not 0.0 < scale <= 4.0:  # NaN fails this too
        raise SpecError(f"{field_at}: {scale} is outside (0, 4]; a character LoRA is applied at about 1.")
    return scale


def _existing_lora_file(value: Any, base_dir: Path, field_at: str, confine_to: Path | None) -> str:
    """The LoRA file a character names: an existing safetensors file holding LoRA weights (the shape check
    against the base model comes later, where the model is loaded: ``pipeline.lora.character_lora``)."""
    from pipeline.lora.character_lora import check_lora_file  # safetensors headers only; no model needed

    path = _resolve(value, base_dir, field_at, confine_to)
    try:
        if not path.is_file():
            raise SpecError(f"{field_at}: LoRA file {path} does not exist.")
        check_lora_file(path)
    except CastloraError as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{field_at}: {exc}") from exc
    except _FS_ERRORS as exc:
        raise SpecError(f"{field_at}: {_shown(str(path), 200)} cannot be read ({_fs_reason(exc)}).") from exc
    return str(path)


def _check_fields(mapping: dict, known: tuple[str, ...], where: str) -> None:
    """Unknown (misspelt) fields are errors, with the closest known field as a suggestion."""
    for name_raw in mapping:
        name = _text(name_raw, f"{where}: field name")
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            suggestion = f"did you mean {hint[0]!r}?" if hint else f"known fields: {', '.join(known)}."
            raise SpecError(f"{where}: unknown field {_shown(name)}; {suggestion}")


def _check_token_phrases(characters: tuple[CharacterSpec, ...], where: str) -> None:
    """CLIP's tokenizer lowercases and splits on whitespace, so 'Vrin Dog' and 'vrin  dog' are one identity."""
    seen: dict[str, str] = {}
    for character in characters:
        normalised = " ".join(character.token_phrase.lower().split())
        if normalised in seen:
            raise SpecError(
                f"{where}: token phrases must differ between characters, but {seen[normalised]!r} and "
                f"{character.id!r} both use {normalised!r} (the text encoder ignores case and extra spaces)."
            )
        seen[normalised] = character.id


def _refuse_shared_photos(characters: tuple[CharacterSpec, ...], where: str) -> None:
    """The same photo (same bytes) given to two characters would teach one identity to both tokens. Only files
    whose sizes collide across characters are hashed, so a spec load stays cheap."""
    by_size: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for character in characters:
        for photo in dict.fromkeys(character.photos):
            by_size[os.stat(photo).st_size].append((character.id, photo))
    for group in by_size.values():
        if len({cid for cid, _ in group}) < 2:
            continue
        by_hash: dict[str, tuple[str, str]] = {}
        for cid, photo in group:
            digest = sha256_file(photo)
            if digest in by_hash and by_hash[digest][0] != cid:
                other_id, other_photo = by_hash[digest]
                raise SpecError(
                    f"{where}: the same photo is given to characters {other_id!r} ({other_photo}) and {cid!r} "
                    f"({photo}); it would teach one identity to both tokens. Keep it for one character only."
                )
            by_hash.setdefault(digest, (cid, photo))


def _text(value: Any, field_at: str) -> str:
    """A text field's value, stripped; numbers, lists, mappings, blanks and NUL bytes are refused."""
    if isinstance(value, _Unquoted):
        raise SpecError(
            f"{field_at}: {_shown(value.text)} is read by YAML as a {value.kind}, not text (010 would become 8); "
            f"put it in quotes: '{value.text[:60]}'."
        )
    if not isinstance(value, str):
        one = " (give one value)" if isinstance(value, list) else ""
        raise SpecError(f"{field_at}: expected text, got a {_kind(value)}{one}.")
    if "\x00" in value:
        raise SpecError(f"{field_at}: contains a NUL byte.")
    if not value.strip():
        raise SpecError(f"{field_at}: is empty (only whitespace).")
    return value.strip()


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return f"list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _yaml_reason(exc: Exception) -> str:
    """One line: what is wrong and where (no snippet of the file, which PyYAML would print over several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return _capped(" ".join(f"{exc.context or ''} {exc.problem} at {where}".split()), 300)
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (invalid byte at position {exc.start})"
    return _capped(" ".join(str(exc).split()), 300)


def _fs_reason(exc: BaseException) -> str:
    """Why a path operation failed, without repeating the (possibly huge) path."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {_capped(detail, 200)}"


def _shown(text: str, limit: int = 80) -> str:
    """``text`` as a short, escaped quotation for an error message."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _capped(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    return message if len(message) <= limit else message[:limit] + f"... [{len(message) - limit} more characters]"


def _optional_folder(entry: dict, name: str, base_dir: Path, field_at: str, confine_to: Path | None) -> str | None:
    """The folder an optional field names (masks, captions), which must exist; None when the field is absent."""
    if entry.get(name) is None:
        return None
    return _existing_folder(entry[name], base_dir, f"{field_at}.{name}", confine_to)


def _existing_folder(value: Any, base_dir: Path, field_at: str, confine_to: Path | None) -> str:
    folder = _resolve(value, base_dir, field_at, confine_to)
    try:
        if not folder.is_dir():
            raise SpecError(f"{field_at}: folder {folder} does not exist.")
        if confine_to is not None:
            # Every file in it (a caption linked to /proc/self/environ, a mask linked to ~/.ssh) stays inside too.
            _confined_folder(folder, confine_to, f"{field_at} folder")
    except ConfinementError as exc:
        raise SpecError(f"{field_at}: {exc}") from exc
    except CastloraError:
        raise
    except _FS_ERRORS as exc:
        raise SpecError(f"{field_at}: folder {_shown(str(folder), 200)} cannot be listed ({_fs_reason(exc)}).") from exc
    return str(folder)


def _resolve(value: Any, base_dir: Path, field_at: str, confine_to: Path | None = None) -> Path:
    text = _text(value, field_at)
    parsed = urlparse(text)
    try:
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise SpecError(f"{field_at}: {_shown(text)} names a host; use file:///absolute/path or file:relative.")
            # A relative file: URI (file:photos/a) is relative to the spec's folder, like a plain path.
            path = Path(unquote(parsed.path))
        elif parsed.scheme and len(parsed.scheme) > 1:
            raise SpecError(f"{field_at}: URI scheme {parsed.scheme!r} is not supported; use a path or file:// URI.")
        else:
            path = Path(text).expanduser()
        # resolve() follows symlinks too, so a link inside the folder that points outside is caught below.
        resolved = (path if path.is_absolute() else base_dir / path).resolve()
    except CastloraError:
        raise
    except _FS_ERRORS as exc:
        raise SpecError(f"{field_at}: {_shown(text)} cannot be used as a path ({_fs_reason(exc)}).") from exc
    if confine_to is not None and not is_within(resolved, confine_to):
        raise SpecError(
            f"{field_at}: {_shown(text)} points outside the pair folder {confine_to}; inbox specs may only name files "
            "inside their own folder."
        )
    return resolved


def _collect_photos(value: Any, base_dir: Path, field_at: str, confine_to: Path | None) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    photos: list[str] = []
    for item in items:
        path = _resolve(item, base_dir, field_at, confine_to)
        try:
            if path.is_dir():
                found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
                if confine_to is not None:
                    # A symlinked file inside a confined folder must not reach outside it either.
                    found = [_resolve(str(p), path, field_at, confine_to) for p in found]
                photos.extend(str(p) for p in found)
            elif path.is_file():
                photos.append(str(path))
            else:
                raise SpecError(f"{field_at}: {path} does not exist.")
        except CastloraError:
            raise
        except _FS_ERRORS as exc:
            raise SpecError(f"{field_at}: {_shown(str(path), 200)} cannot be listed ({_fs_reason(exc)}).") from exc
    if not photos:
        raise SpecError(f"{field_at}: no files found.")
    return tuple(photos)
