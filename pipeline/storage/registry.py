"""Registered pairs: a validated spec snapshot at ``pairs/<pair>/pair.json`` and the inbox that feeds it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import CastloraError, PairKeyError
from pipeline.spec import PairSpec, check_confinement, find_spec_file, load_spec
from pipeline.storage.atomic import write_text_atomic
from pipeline.storage.hashing import sha256_bytes, sha256_file, sha256_json
from pipeline.storage.paths import PAIR_SPEC_FILE, DataLayout, validate_key
from pipeline.storage.stored_paths import loaded_path, stored_path


@dataclass(frozen=True)
class InboxEntry:
    folder: Path
    spec: PairSpec | None
    error: str | None

    @property
    def pair_key(self) -> str:
        return self.spec.pair if self.spec else self.folder.name


def register_pair(layout: DataLayout, spec: PairSpec) -> Path:
    """Write the normalised spec for ``spec.pair`` (atomic); re-registering replaces it, and an unchanged
    spec is not rewritten (the sensor registers every inbox folder on every tick)."""
    target = layout.spec_path(spec.pair)
    text = _with_paths(spec, lambda p: stored_path(p, target.parent, layout.home)).to_json()
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return target
    return write_text_atomic(text, target)


def spec_fingerprint(spec: PairSpec) -> str:
    """Changes whenever the spec or the list of photo files changes (used as the sensor's run key)."""
    return sha256_bytes(_fingerprinted(spec).to_json().encode())[:16]


def references_fingerprint(spec: PairSpec) -> str:
    """Changes when the spec or the bytes of any photo, mask, caption or class image it names change.

    The retraining schedule compares it with the one the ``references`` asset recorded, so an edited photo
    makes its pair stale while untouched pairs are left alone. A file that vanished hashes as ``missing``.
    """
    folders = [Path(d) for c in spec.characters for d in (c.masks_dir, c.captions_dir) if d]
    folders += [Path(f) for f in spec.class_images.values()]
    files = [Path(p) for c in spec.characters for p in (*c.photos, *([c.lora] if c.lora else []))]
    files += [f for folder in folders if folder.is_dir() for f in sorted(folder.iterdir()) if f.is_file()]
    contents = {str(f): sha256_file(f) if f.is_file() else "missing" for f in files}
    return sha256_json({"spec": _fingerprinted(spec).to_json(), "files": contents})[:16]


def _fingerprinted(spec: PairSpec) -> PairSpec:
    """``confined_to`` is the source's folder, already in the spec: leaving it out keeps older fingerprints (and
    run keys) unchanged, so adding it did not re-run every inbox pair."""
    return replace(spec, confined_to=None)


def load_registered(layout: DataLayout, pair_key: str) -> PairSpec:
    validate_key(pair_key)
    path = layout.spec_path(pair_key)
    if not path.is_file():
        raise PairKeyError(
            f"Pair {pair_key!r} is not registered: {path} does not exist. Register it with "
            f"`castlora register <folder with pair.yaml>` or drop the folder into {layout.inbox}."
        )
    try:
        spec = PairSpec.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as exc:
        raise CastloraError(f"{path} is corrupt ({exc}); register the pair again.") from exc
    # Check-then-use: an inbox pair's files are re-checked against its folder every time a stage loads the spec.
    # The folder is checked as named (loading resolves links), so a pair folder swapped for a symlink is caught.
    named_root = Path(os.path.normpath(path.parent / spec.confined_to)) if spec.confined_to else None
    return check_confinement(_with_paths(spec, lambda p: loaded_path(p, path.parent)), named_root)


def _with_paths(spec: PairSpec, convert: Callable[[str], str]) -> PairSpec:
    """``spec`` with ``convert`` applied to every file and folder it names. The registered copy stores those
    inside the data home (inbox folders) relative to itself, so the home can move
    (``pipeline.storage.stored_paths``)."""
    characters = tuple(
        replace(
            c,
            photos=tuple(map(convert, c.photos)),
            masks_dir=convert(c.masks_dir) if c.masks_dir else None,
            captions_dir=convert(c.captions_dir) if c.captions_dir else None,
            lora=convert(c.lora) if c.lora else None,
        )
        for c in spec.characters
    )
    class_images = {k: convert(v) for k, v in spec.class_images.items()}
    source = convert(spec.source) if spec.source else spec.source
    confined_to = convert(spec.confined_to) if spec.confined_to else None
    return replace(spec, characters=characters, class_images=class_images, source=source, confined_to=confined_to)


def registered_pairs(layout: DataLayout) -> list[str]:
    root = layout.home / "pairs"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / PAIR_SPEC_FILE).is_file())


def scan_inbox(layout: DataLayout) -> list[InboxEntry]:
    """Every inbox folder that holds a spec file, parsed; a malformed one carries its error instead, whatever
    went wrong in it (one bad folder never stops the others)."""
    if not layout.inbox.is_dir():
        return []
    entries: list[InboxEntry] = []
    for folder in sorted(p for p in layout.inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            if find_spec_file(folder) is None:
                continue
            validate_key(folder.name, "inbox folder name (used as the pair key)")
            entries.append(InboxEntry(folder, load_spec(folder, pair_key=folder.name, confine=True), None))
        except CastloraError as exc:
            entries.append(InboxEntry(folder, None, str(exc)))
        except Exception as exc:  # anything else in one folder must not stop the sensor tick
            entries.append(InboxEntry(folder, None, f"unexpected {type(exc).__name__}: {str(exc)[:300]}"))
    return entries
