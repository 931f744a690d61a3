"""Seg-Mix throughput: castlora's ``pipeline.segmix.compose`` vs a naive MuDI Algorithm 1, same inputs, same run.

Run from the repository root:

    python -m benchmarks.bench_segmix                      # synthetic photos (+ the sample pair if present)
    python benchmarks/bench_segmix.py --photos DIR_A DIR_B # two characters' photo folders

Each scenario takes two characters' photos with a subject mask each. The naive baseline
(``benchmarks/mudi_naive_segmix.py``) starts every composite from the full photo and full-size mask, as
MuDI's training loop does. Ours gets the RGBA cut-outs once (``cutout_rgba``) and ``prepare_subjects``
once, both timed separately as one-off costs, then composes. Masks: synthetic photos have an exact
ellipse subject; real photos get a centred ellipse mask (no segmentation model is run; for timing only
the mask's size matters). Prints a table and writes ``benchmarks/results/segmix.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `python benchmarks/bench_segmix.py` puts benchmarks/ first on sys.path
    sys.path.insert(0, str(_REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.mudi_naive_segmix import naive_seg_mix  # noqa: E402
from pipeline.segment.masks import cutout_rgba  # noqa: E402
from pipeline.segmix.compose import SegMixConfig, SegMixSubject, compose, prepare_subjects  # noqa: E402

SAMPLE_DIRS = (_REPO / "samples/dog6__dog2/dog6", _REPO / "samples/dog6__dog2/dog2")
RESULTS = _REPO / "benchmarks/results/segmix.json"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class Character:
    name: str
    photos: list[Image.Image]
    masks: list[Image.Image]
    """Full-size "L" masks, 255 = subject."""


def ellipse_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def synthetic_character(name: str, seed: int, count: int = 3, size: tuple[int, int] = (1536, 1152)) -> Character:
    """Photos with a textured background and an ellipse subject of varying size and place."""
    rng = np.random.default_rng(seed)
    width, height = size
    photos, masks = [], []
    for _ in range(count):
        background = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        photo = Image.fromarray(background).resize(size, Image.Resampling.BILINEAR)
        w, h = int(width * rng.uniform(0.4, 0.7)), int(height * rng.uniform(0.5, 0.85))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        box = (x, y, x + w, y + h)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        ImageDraw.Draw(photo).ellipse(box, fill=colour)
        photos.append(photo)
        masks.append(ellipse_mask(size, box))
    return Character(name, photos, masks)


def folder_character(folder: Path) -> Character:
    """Real photos with a centred ellipse mask (80% of width, 90% of height) standing in for SAM's."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise SystemExit(f"bench_segmix: no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {folder}")
    photos, masks = [], []
    for path in paths:
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        w, h = photo.size
        photos.append(photo)
        masks.append(ellipse_mask(photo.size, (w // 10, h // 20, w - w // 10, h - h // 20)))
    return Character(folder.name, photos, masks)


def best_of_interleaved(repeats: int, runs: Sequence[Callable[[], None]]) -> list[float]:
    """Fastest wall time of each run over ``repeats`` rounds; the runs alternate within a round, so a busy
    spell on a shared machine hits all of them rather than one."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def bench_scenario(name: str, characters: Sequence[Character], n: int, repeats: int, seed: int) -> dict:
    first, second = characters
    pairs = [(i % len(first.photos), i % len(second.photos)) for i in range(n)]
    config = SegMixConfig()
    fast = SegMixConfig(resample="bilinear")

    start = time.perf_counter()
    cutouts = [
        [
            SegMixSubject(cutout_rgba(p, np.asarray(m) > 128), phrase, c.name)
            for p, m in zip(c.photos, c.masks, strict=True)
        ]
        for c, phrase in ((first, "olis dog"), (second, "sks dog"))
    ]
    cutout_s = time.perf_counter() - start
    start = time.perf_counter()
    prepared = [prepare_subjects(group, config) for group in cutouts]
    prepare_s = time.perf_counter() - start
    prepared_fast = [prepare_subjects(group, fast) for group in cutouts]

    def run_naive() -> None:
        rng = random.Random(seed)
        for a, b in pairs:
            naive_seg_mix([first.photos[a], second.photos[b]], [first.masks[a], second.masks[b]], rng)

    def run_ours() -> None:
        for i, (a, b) in enumerate(pairs):
            compose([prepared[0][a], prepared[1][b]], config, seed=seed + i)

    def run_ours_bilinear() -> None:
        for i, (a, b) in enumerate(pairs):
            compose([prepared_fast[0][a], prepared_fast[1][b]], fast, seed=seed + i)

    def run_ours_unprepared() -> None:
        for i, (a, b) in enumerate(pairs):
            compose([cutouts[0][a], cutouts[1][b]], config, seed=seed + i)

    run_naive(), run_ours()  # warm-up: first-call imports and allocations
    naive_s, ours_s, bilinear_s, unprepared_s = best_of_interleaved(
        repeats, [run_naive, run_ours, run_ours_bilinear, run_ours_unprepared]
    )
    composites = [compose([prepared[0][a], prepared[1][b]], config, seed=seed + i) for i, (a, b) in enumerate(pairs)]
    occlusion = [max(c.occlusion) for c in composites]
    return {
        "scenario": name,
        "characters": [c.name for c in characters],
        "photos": [len(c.photos) for c in characters],
        "photo_sizes": sorted({f"{p.width}x{p.height}" for c in characters for p in c.photos}),
        "composites": n,
        "repeats": repeats,
        "naive_ms": 1000 * naive_s / n,
        "ours_ms": 1000 * ours_s / n,
        "ours_bilinear_ms": 1000 * bilinear_s / n,
        "ours_unprepared_ms": 1000 * unprepared_s / n,
        "naive_per_s": n / naive_s,
        "ours_per_s": n / ours_s,
        "speedup": naive_s / ours_s,
        "speedup_bilinear": naive_s / bilinear_s,
        "speedup_unprepared": naive_s / unprepared_s,
        "one_off_cutout_ms": 1000 * cutout_s,
        "one_off_prepare_ms": 1000 * prepare_s,
        "ours_mean_attempts": statistics.fmean(c.attempts for c in composites),
        "ours_max_occlusion": max(occlusion),
    }


def machine() -> dict:
    import PIL

    return {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def print_table(rows: Sequence[dict]) -> None:
    header = (
        f"{'scenario':<22} {'photos':<10} {'naive ms':>8} {'ours ms':>8} {'naive/s':>8} {'ours/s':>8} "
        f"{'speedup':>8} {'bilinear':>9} {'unprep.':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['scenario']:<22} {','.join(r['photo_sizes']):<10} "
            f"{r['naive_ms']:>8.1f} {r['ours_ms']:>8.1f} "
            f"{r['naive_per_s']:>8.1f} {r['ours_per_s']:>8.1f} {r['speedup']:>7.1f}x "
            f"{r['speedup_bilinear']:>8.1f}x {r['speedup_unprepared']:>7.1f}x"
        )
    print(
        "ours = prepared cut-outs, default config (bicubic, like the naive baseline); bilinear = ours with "
        "resample='bilinear';\nunprep. = ours when every compose() call also validates/trims/prepares its "
        "cut-outs again. Speedups are vs naive."
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs=2, type=Path, metavar="DIR", help="two characters' photo folders")
    parser.add_argument("--n", type=int, default=40, help="composites per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per method; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic 1536x1152 scenario")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    rows = []
    if not args.no_synthetic:
        synthetic = [synthetic_character("synthetic_a", 1), synthetic_character("synthetic_b", 2)]
        rows.append(bench_scenario("synthetic 1536x1152", synthetic, args.n, args.repeats, args.seed))
    folders = args.photos or (SAMPLE_DIRS if all(d.is_dir() for d in SAMPLE_DIRS) else None)
    if folders:
        label = "photos " + "__".join(Path(f).name for f in folders)
        rows.append(
            bench_scenario(label, [folder_character(Path(f)) for f in folders], args.n, args.repeats, args.seed)
        )
    if not rows:
        raise SystemExit("bench_segmix: nothing to run (--no-synthetic and no photo folders)")

    print_table(rows)
    program = "-m benchmarks.bench_segmix" if __package__ else sys.argv[0]
    command = " ".join(["python", program, *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "machine": machine(), "scenarios": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
