"""Atomic writes, the one scheme for every file and folder castlora writes (images, caches, checkpoints, LoRA
exports, manifests): write beside the target under a hidden temporary name, then rename, so readers never see a
half-written file and an interrupted run leaves only a temporary to ignore (docs/design.md#content-hash-caches)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path in ``target``'s folder; renamed onto ``target`` when the block succeeds, else removed.

    The temporary keeps ``target``'s suffix (writers such as PIL or diffusers pick the format from it) and is
    unique, so concurrent writers (DDP ranks writing the same cache entry) never share one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".tmp-{target.stem}-", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target``; when the block succeeds it replaces ``target`` (an existing folder
    there is moved aside first, then deleted), else it is removed. Readers see the old folder or the new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield temporary
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{target.name}-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_text_atomic(text: str, target: Path) -> Path:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(target)


def write_json_atomic(value: Any, target: Path) -> Path:
    return write_text_atomic(json.dumps(value, indent=2, default=str) + "\n", target)
