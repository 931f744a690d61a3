"""Content-addressed caption cache: one small JSON file per key, written atomically.

Captions can cost money (API calls) or minutes (local VLMs), so they are kept across runs. One file per
key means concurrent runs never rewrite a shared index, and an interrupted write leaves no partial file.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from pipeline.storage.atomic import write_text_atomic

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class CaptionCache:
    """Raw captions under ``root/<key[:2]>/<key>.json``; keys are SHA-256 hex digests."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        # Keys become file names, so only accept hex digests: nothing can escape the root.
        if not _KEY_RE.match(key):
            raise ValueError(f"Caption cache key must be a 64-character SHA-256 hex digest, got {key!r}.")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached raw caption, or None when absent or unreadable (an unreadable entry is re-made)."""
        path = self.path_for(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("Ignoring unreadable caption cache entry %s (%s); it will be recomputed.", path, exc)
            return None
        caption = entry.get("raw_caption") if isinstance(entry, dict) else None
        if not isinstance(caption, str) or entry.get("key") != key:
            log.warning("Ignoring malformed caption cache entry %s; it will be recomputed.", path)
            return None
        return caption

    def put(self, key: str, raw_caption: str, meta: dict[str, Any]) -> None:
        path = self.path_for(key)
        entry = {"key": key, "raw_caption": raw_caption, "meta": meta, "created_unix": time.time()}
        payload = json.dumps(entry, indent=2, sort_keys=True, default=str, ensure_ascii=False)
        write_text_atomic(payload + "\n", path)
