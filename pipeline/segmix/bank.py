"""A finite, reproducible bank of Seg-Mix composites (docs/design.md#seg-mix-bank).

MuDI draws a fresh composite at every training step; castlora plans a fixed bank per epoch instead, so
the composites can be materialized as an asset, inspected, and have their latents cached by content
hash. ``plan_bank`` decides *what* goes in each composite (pure, cheap, deterministic in its seed);
``render_bank`` composes them; ``write_bank_entry`` stores one composite and returns its manifest row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.images import mask_to_image, save_png
from pipeline.segmix.compose import (
    DEFAULT_CONFIG,
    Composite,
    PreparedSubject,
    SegMixConfig,
    SegMixError,
    SegMixSubject,
    compose,
    config_hash,
    prepare_subject,
)


@dataclass(frozen=True)
class BankEntry:
    index: int
    seed: int
    """Seed for ``compose``, derived from (bank seed, index): an entry renders the same on its own."""
    subjects: tuple[SegMixSubject, ...]
    canvas: tuple[int, int] | None = None
    """(width, height) of this composite's canvas; None = the config's (docs/design.md#aspect-ratio-buckets)."""

    def config(self, config: SegMixConfig) -> SegMixConfig:
        """``config`` with this entry's canvas."""
        return config if self.canvas is None or self.canvas == config.canvas else replace(config, canvas=self.canvas)

    @property
    def character_ids(self) -> list[str]:
        return [s.character_id for s in self.subjects]


def entry_seed(seed: int, index: int) -> int:
    """63-bit seed from (seed, index) via SHA-256: stable across numpy versions and platforms."""
    digest = hashlib.sha256(f"castlora-segmix-bank:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class _Cycler:
    """Hands out one character's cut-outs in reshuffled rounds, so use counts differ by at most one."""

    def __init__(self, items: Sequence[SegMixSubject], rng: np.random.Generator) -> None:
        self._items = list(items)
        self._rng = rng
        self._queue: list[SegMixSubject] = []

    def next(self) -> SegMixSubject:
        if not self._queue:
            self._queue = [self._items[i] for i in self._rng.permutation(len(self._items))]
        return self._queue.pop()


def plan_bank(
    subjects_by_character: Mapping[str, Sequence[SegMixSubject]],
    n: int,
    config: SegMixConfig = DEFAULT_CONFIG,
    seed: int = 0,
    canvases: Sequence[tuple[int, int]] = (),
) -> list[BankEntry]:
    """``n`` entries of ``config.k`` cut-outs of *different* characters each, deterministic in ``seed``.

    ``canvases`` (optional, (width, height) each): entry i is composed on ``canvases[i % len(canvases)]``, so a
    bank comes in several aspect ratios in equal shares; the cut-out plan does not depend on them. Empty: every
    entry on ``config.canvas``.

    With k == number of characters every entry has all of them; otherwise each entry takes the k least
    used characters so far (ties broken at random), so characters, like cut-outs, are used evenly.
    Within a character, cut-outs are handed out in reshuffled rounds. Characters are taken in sorted id
    order, so the plan does not depend on the mapping's insertion order.
    """
    if n < 0:
        raise SegMixError(f"plan_bank: n must be >= 0 composites, got {n}")
    characters = sorted(subjects_by_character)
    empty = [c for c in characters if not subjects_by_character[c]]
    if empty:
        raise SegMixError(f"plan_bank: character(s) {empty} have no cut-outs; segment their photos first or drop them")
    if len(characters) < config.k:
        raise SegMixError(
            f"plan_bank: Seg-Mix needs {config.k} different characters per composite (SegMixConfig.k) but "
            f"only {len(characters)} are given ({characters}); add characters or lower k"
        )
    rng = np.random.default_rng(seed)
    cyclers = {c: _Cycler(subjects_by_character[c], rng) for c in characters}
    uses = dict.fromkeys(characters, 0)
    entries = []
    for index in range(n):
        if config.k == len(characters):
            chosen = characters
        else:
            shuffled = [characters[i] for i in rng.permutation(len(characters))]
            chosen = sorted(sorted(shuffled, key=uses.__getitem__)[: config.k])
        for character in chosen:
            uses[character] += 1
        subjects = tuple(cyclers[c].next() for c in chosen)
        canvas = tuple(canvases[index % len(canvases)]) if canvases else None
        entries.append(BankEntry(index=index, seed=entry_seed(seed, index), subjects=subjects, canvas=canvas))
    return entries


def render_bank(
    entries: Iterable[BankEntry], config: SegMixConfig = DEFAULT_CONFIG
) -> Iterator[tuple[BankEntry, Composite]]:
    """Compose each entry with its own seed on its own canvas; each distinct cut-out is prepared once per canvas
    and reused."""
    prepared: dict[tuple[int, tuple[int, int]], PreparedSubject] = {}  # the cached value keeps the subject alive
    for entry in entries:
        entry_config = entry.config(config)
        items = []
        for position, subject in enumerate(entry.subjects):
            key = (id(subject), entry_config.canvas)
            cached = prepared.get(key)
            if cached is None or cached.subject is not subject:
                cached = prepared[key] = prepare_subject(subject, entry_config, position)
            items.append(cached)
        yield entry, compose(items, entry_config, entry.seed)


def write_bank_entry(entry: BankEntry, composite: Composite, folder: Path, config: SegMixConfig) -> dict[str, Any]:
    """Write ``{index}.png``, ``{index}_union.png`` and ``{index}_mask{j}.png`` into ``folder``.

    Returns the manifest row; paths in it are relative to ``folder`` (POSIX), so the folder can move.
    Masks are 0/255 grayscale (>128 = subject, what ``pipeline.images.load_mask`` reads back).
    """
    stem = f"{entry.index:06d}"
    image_name = f"{stem}.png"
    union_name = f"{stem}_union.png"
    mask_names = [f"{stem}_mask{j}.png" for j in range(len(composite.masks))]
    image_sha = save_png(composite.image, folder / image_name)
    union_sha = save_png(mask_to_image(composite.union_mask), folder / union_name)
    mask_shas = [save_png(mask_to_image(m), folder / name) for m, name in zip(composite.masks, mask_names, strict=True)]
    config = entry.config(config)
    return {
        "index": entry.index,
        "image_path": image_name,
        "image_sha256": image_sha,
        "union_mask_path": union_name,
        "union_mask_sha256": union_sha,
        "mask_paths": mask_names,
        "mask_sha256s": mask_shas,
        "boxes_json": json.dumps([list(box) for box in composite.boxes]),
        "prompt": composite.prompt,
        "phrases": list(composite.phrases),
        "character_ids": entry.character_ids,
        "parent_sha256s": [s.sha256 for s in entry.subjects],
        "occlusion": [float(x) for x in composite.occlusion],
        "attempts": composite.attempts,
        "seed": entry.seed,
        "config_hash": config_hash(config),
        "canvas_width": composite.image.width,
        "canvas_height": composite.image.height,
    }
