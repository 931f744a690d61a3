"""Byte-reproducible safetensors files (docs/design.md#reproducible-lora-files).

safetensors writes its ``__metadata__`` from a Rust hash map, so the header's key order (and therefore the file's
SHA-256) changes from one process to the next for the same tensors and metadata; PEFT's adapter config adds a
``target_modules`` list built from a set. Every LoRA castlora writes goes through :func:`canonicalize_safetensors`
so that the same training gives the same bytes, and hashes of LoRA files (manifests, iteration run ids) are stable.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from pipeline.errors import CastloraError
from pipeline.storage.atomic import atomic_path

_LENGTH = struct.Struct("<Q")
_ALIGN = 8
_SET_VALUED = ("target_modules", "exclude_modules", "modules_to_save")
"""Adapter-config lists whose order is a set's iteration order (meaningless, and hash-seed dependent)."""


def canonicalize_safetensors(path: str | Path) -> Path:
    """Rewrite ``path`` with its header in one canonical form: metadata keys sorted, JSON-valued metadata (PEFT
    adapter configs) re-encoded with sorted keys and sorted set-valued lists. Tensors and their order are
    untouched; a file already canonical is left as is."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _LENGTH.size:
        raise CastloraError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
    (length,) = _LENGTH.unpack_from(data)
    body_start = _LENGTH.size + length
    if body_start > len(data):
        raise CastloraError(f"{path} is not a safetensors file (header length {length} beyond the file's end).")
    try:
        header = json.loads(data[_LENGTH.size : body_start])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CastloraError(f"{path} is not a safetensors file (header is not JSON: {exc}).") from exc
    metadata = header.pop("__metadata__", None)
    canonical: dict[str, Any] = {}
    if metadata:
        canonical["__metadata__"] = {key: _canonical_value(metadata[key]) for key in sorted(metadata)}
    # Tensor entries keep the writer's order: their data offsets follow it.
    canonical.update(header)
    encoded = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)
    rewritten = _LENGTH.pack(len(encoded)) + encoded + data[body_start:]
    if rewritten != data:
        with atomic_path(path) as temporary:
            temporary.write_bytes(rewritten)
    return path


def _canonical_value(value: str) -> str:
    """A JSON object stored as a metadata string (``lora_adapter_metadata``) re-encoded canonically."""
    if not value.startswith("{"):
        return value
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return value
    return json.dumps(_sorted_sets(decoded), indent=2, sort_keys=True)  # as diffusers writes it


def _sorted_sets(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: sorted(item, key=str) if key in _SET_VALUED and isinstance(item, list) else _sorted_sets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_sorted_sets(item) for item in value]
    return value
