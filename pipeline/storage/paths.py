"""Where castlora keeps things, and which names are safe to turn into paths.

Layout under the data home (``CASTLORA_HOME``, default ``./castlora_data``)::

    inbox/<pair>/pair.yaml        pair folders dropped by users, picked up by the sensor
    pairs/<pair>/pair.json        the registered, normalised spec
    pairs/<pair>/<stage>/...      artifacts of each asset
    lineage/<asset>/...parquet    one lineage row per artifact
    cache/...                     content-addressed caches (captions, tiny models)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfinementError, DataHomeError, PairKeyError

DEFAULT_HOME = "castlora_data"
HOME_ENV = "CASTLORA_HOME"
PAIR_SPEC_FILE = "pair.json"  # marks a registered pair folder

_SAFE_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")


def validate_key(key: str, what: str = "pair key") -> str:
    """Return ``key`` if it is safe as a single path component, else raise PairKeyError.

    Safe means lowercase letters, digits, ``_`` and ``-`` only, starting with a letter or digit: no path
    separators, no dots, no spaces, so a key can never escape the data home.
    """
    if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key):
        raise PairKeyError(
            f"Invalid {what} {key!r}: use 1-128 characters from [a-z0-9_-], starting with a letter or digit "
            "(no spaces, dots or slashes), e.g. 'dog6__dog2'."
        )
    return key


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The data home: explicit argument, else $CASTLORA_HOME, else ./castlora_data (absolute)."""
    chosen = home if home else os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


def check_home(home: Path) -> Path:
    """Refuse a data home that exists but is not a folder: every path under it would fail with a vaguer error."""
    if home.exists() and not home.is_dir():
        raise DataHomeError(
            f"The data home {home} is not a folder (it is a file): set CASTLORA_HOME, or the storage resource's "
            "'home', to a folder."
        )
    return home


def is_within(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or lies below it (both already resolved: no links, no ``..``)."""
    return path == root or root in path.parents


def safe_child(root: Path, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and refuse any result that escapes ``root``."""
    root = root.resolve()
    candidate = root.joinpath(*parts).resolve()
    if not is_within(candidate, root):
        raise PairKeyError(f"Path {'/'.join(parts)!r} escapes {root}; refusing to use it.")
    return candidate


def confined_path(path: str | os.PathLike[str], root: Path, what: str) -> Path:
    """``path`` resolved (symlinks followed), refused unless it lies inside ``root``.

    Inbox folders may come from anyone who can write to the inbox, so every file their spec names is re-checked
    with this right before it is read: a file swapped for a symlink after registration is caught at that read.
    """
    try:
        root, resolved = Path(root).resolve(), Path(path).resolve()
        inside = is_within(resolved, root)
    except (OSError, RuntimeError, ValueError) as exc:  # link loops, over-long names, NUL bytes
        raise ConfinementError(f"{what} {str(path)[:300]!r} cannot be resolved ({type(exc).__name__}).") from exc
    if not inside:
        raise ConfinementError(
            f"{what} {str(path)[:300]!r} points outside the pair folder {root}; inbox pair folders may only use "
            "files inside themselves (replace the link with the file itself)."
        )
    return resolved


@dataclass(frozen=True)
class DataLayout:
    """Paths of the data home. Pure path arithmetic: nothing is created until ``ensure`` is called."""

    home: Path

    @classmethod
    def at(cls, home: str | os.PathLike[str] | None = None) -> DataLayout:
        return cls(resolve_home(home))

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def lineage(self) -> Path:
        return self.home / "lineage"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def models(self) -> Path:
        return self.cache / "models"

    def pair_dir(self, pair_key: str) -> Path:
        return safe_child(self.home / "pairs", validate_key(pair_key))

    def stage_dir(self, pair_key: str, stage: str) -> Path:
        return safe_child(self.pair_dir(pair_key), validate_key(stage, "stage name"))

    def spec_path(self, pair_key: str) -> Path:
        return self.pair_dir(pair_key) / PAIR_SPEC_FILE

    def ensure(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path
