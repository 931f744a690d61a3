from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import load_mask
from pipeline.segmix.bank import entry_seed, plan_bank, render_bank, write_bank_entry
from pipeline.segmix.compose import SegMixConfig, SegMixError, SegMixSubject, compose, config_hash
from pipeline.storage.hashing import sha256_file

CONFIG = SegMixConfig(canvas=(192, 192))


def cutout(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx + 0.5) / (width / 2) - 1) ** 2 + ((yy + 0.5) / (height / 2) - 1) ** 2 <= 1
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[inside] = (*colour, 255)
    return Image.fromarray(rgba)


def character(name: str, count: int, colour: tuple[int, int, int]) -> list[SegMixSubject]:
    return [
        SegMixSubject(cutout(90 + 7 * i, 110 - 5 * i, colour), f"{name} thing", name, sha256=f"{name}-{i}")
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def cast() -> dict[str, list[SegMixSubject]]:
    return {"dog6": character("dog6", 3, (200, 40, 40)), "dog2": character("dog2", 5, (40, 40, 200))}


@pytest.fixture(scope="module")
def trio() -> dict[str, list[SegMixSubject]]:
    return {
        "a": character("a", 2, (200, 40, 40)),
        "b": character("b", 3, (40, 200, 40)),
        "c": character("c", 4, (40, 40, 200)),
    }


def signature(entries: list) -> list[tuple]:
    return [(e.index, e.seed, tuple(s.sha256 for s in e.subjects)) for e in entries]


def test_every_entry_has_k_distinct_characters(trio: dict) -> None:
    entries = plan_bank(trio, 30, CONFIG, seed=1)
    assert len(entries) == 30 and [e.index for e in entries] == list(range(30))
    for entry in entries:
        assert len(entry.subjects) == 2
        assert len(set(entry.character_ids)) == 2
    usage = Counter(c for e in entries for c in e.character_ids)
    assert max(usage.values()) - min(usage.values()) <= 1
    assert len({tuple(e.character_ids) for e in entries}) == 3  # every pairing of the three appears


def test_all_characters_when_k_equals_their_number(cast: dict) -> None:
    for entry in plan_bank(cast, 10, CONFIG, seed=0):
        assert sorted(entry.character_ids) == ["dog2", "dog6"]


def test_cutouts_are_used_evenly(cast: dict) -> None:
    entries = plan_bank(cast, 31, CONFIG, seed=4)
    uses = Counter(s.sha256 for e in entries for s in e.subjects)
    for name, subjects in cast.items():
        counts = [uses[s.sha256] for s in subjects]
        assert max(counts) - min(counts) <= 1, (name, counts)
    assert sum(uses.values()) == 62


def test_plan_is_deterministic_and_seeded(cast: dict) -> None:
    reversed_cast = dict(reversed(list(cast.items())))
    assert signature(plan_bank(cast, 12, CONFIG, seed=7)) == signature(plan_bank(reversed_cast, 12, CONFIG, seed=7))
    assert signature(plan_bank(cast, 12, CONFIG, seed=7)) != signature(plan_bank(cast, 12, CONFIG, seed=8))
    seeds = [e.seed for e in plan_bank(cast, 50, CONFIG, seed=7)]
    assert len(set(seeds)) == 50
    assert entry_seed(7, 3) == seeds[3] and entry_seed(8, 3) != seeds[3]


def test_plan_errors(cast: dict) -> None:
    with pytest.raises(SegMixError, match="different characters"):
        plan_bank(cast, 3, SegMixConfig(canvas=(192, 192), k=3), seed=0)
    with pytest.raises(SegMixError, match="no cut-outs"):
        plan_bank({"dog6": cast["dog6"], "empty": []}, 3, CONFIG, seed=0)


def test_render_matches_compose_per_entry(cast: dict) -> None:
    entries = plan_bank(cast, 6, CONFIG, seed=2)
    rendered = list(render_bank(entries, CONFIG))
    assert [entry for entry, _ in rendered] == entries
    for entry, composite in rendered:
        alone = compose(list(entry.subjects), CONFIG, entry.seed)
        assert composite.image.tobytes() == alone.image.tobytes()
        assert composite.seed == entry.seed


def test_write_entry_files_and_manifest_row(cast: dict, tmp_path: Path) -> None:
    entry, composite = next(render_bank(plan_bank(cast, 1, CONFIG, seed=3), CONFIG))
    row = write_bank_entry(entry, composite, tmp_path, CONFIG)
    image_path = tmp_path / row["image_path"]
    assert row["image_sha256"] == sha256_file(image_path)
    with Image.open(image_path) as written:
        assert written.tobytes() == composite.image.tobytes()
    assert np.array_equal(load_mask(tmp_path / row["union_mask_path"]), composite.union_mask)
    for path, digest, mask in zip(row["mask_paths"], row["mask_sha256s"], composite.masks, strict=True):
        assert sha256_file(tmp_path / path) == digest
        assert np.array_equal(load_mask(tmp_path / path), mask)
    assert json.loads(row["boxes_json"]) == [list(b) for b in composite.boxes]
    assert row["character_ids"] == entry.character_ids
    assert row["parent_sha256s"] == [s.sha256 for s in entry.subjects]
    assert row["prompt"] == composite.prompt and row["seed"] == entry.seed
    assert row["config_hash"] == config_hash(CONFIG)
    assert row["occlusion"] == composite.occlusion
    json.dumps(row)  # a manifest row must be plain data


def test_bank_renders_canvases_by_aspect(cast: dict, tmp_path: Path) -> None:
    """docs/design.md#aspect-ratio-buckets: with canvas sizes the entries take them in turn, the cut-out plan stays
    the square bank's, and each composite (image and masks) has its entry's canvas."""
    from pipeline.buckets import CANVAS_MULTIPLE, canvas_sizes

    canvases = canvas_sizes("1:1,4:3,3:4", 192, 192)
    assert canvases[0] == (192, 192) and len(canvases) == 3
    for width, height in canvases:
        assert width % CANVAS_MULTIPLE == 0 and height % CANVAS_MULTIPLE == 0
        assert abs(width * height - 192 * 192) <= CANVAS_MULTIPLE * (width + height) / 2
    assert canvases[1][0] > canvases[1][1] and canvases[2][0] < canvases[2][1]
    assert canvas_sizes("square", 192, 160) == ((192, 160),)

    entries = plan_bank(cast, 6, CONFIG, seed=3, canvases=canvases)
    assert signature(entries) == signature(plan_bank(cast, 6, CONFIG, seed=3))
    assert [e.canvas for e in entries] == [*canvases, *canvases]
    for entry, composite in render_bank(entries, CONFIG):
        width, height = entry.canvas
        assert composite.image.size == (width, height)
        assert composite.union_mask.shape == (height, width)
        assert all(box[2] <= width and box[3] <= height for box in composite.boxes)
        row = write_bank_entry(entry, composite, tmp_path, CONFIG)
        assert (row["canvas_width"], row["canvas_height"]) == (width, height)
        assert Image.open(tmp_path / row["union_mask_path"]).size == (width, height)
    # One entry renders the same alone as in its bank (its canvas travels with it).
    alone = next(iter(render_bank(entries[1:2], CONFIG)))[1]
    assert np.array_equal(
        np.asarray(alone.image),
        np.asarray(compose(entries[1].subjects, entries[1].config(CONFIG), entries[1].seed).image),
    )
