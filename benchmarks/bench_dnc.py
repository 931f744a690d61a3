"""Detect-and-Compare throughput on CPU with the tiny models: batched vs one image at a time, same run.

Run from the repository root:

    python -m benchmarks.bench_dnc                  # 64 images, 256 px, 2 boxes each, batch 16, 1 thread

For each detector (the layout fallback and the tiny OWLv2) the same images are scored with the tiny DINOv2 and
CLIP embedders in both D&C modes, by ``score_images(batch_size=B)`` (one detector call per B images, all their
crops through each embedder in one call) and by ``score_images_one_by_one`` (one detector call and one embedder
call per image). The references are embedded once beforehand and shared by both, so the timings are the
per-image work. One warm-up call each, then ``--repeats`` alternating timed runs; the median is reported.
Writes ``benchmarks/results/dnc_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `python benchmarks/bench_dnc.py` puts benchmarks/ first on sys.path
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from pipeline.dnc.detect import Box, LayoutDetector, OwlDetector  # noqa: E402
from pipeline.dnc.embed import ClipImageEmbedder, Dinov2Embedder, Embedder  # noqa: E402
from pipeline.dnc.image_scores import (  # noqa: E402
    DncRecord,
    SubjectReferences,
    embed_all_references,
    score_images,
    score_images_one_by_one,
)
from pipeline.models.tiny_embedders import build_tiny_clip, build_tiny_dinov2  # noqa: E402
from pipeline.models.tiny_vision import build_tiny_owlv2  # noqa: E402

RESULTS = _REPO / "benchmarks/results/dnc_cpu.json"
COLOURS = ((200, 60, 40), (40, 90, 200))
NOUNS = ("dog", "cat")


def generated_like(count: int, size: int, seed: int) -> tuple[list[Image.Image], list[list[Box]]]:
    """Noisy backgrounds with two coloured 'characters' side by side; their boxes are the layout."""
    rng = np.random.default_rng(seed)
    images, layouts = [], []
    for _ in range(count):
        pixels = rng.integers(150, 240, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        boxes: list[Box] = []
        for k, colour in enumerate(COLOURS):
            x0 = k * size // 2 + int(rng.integers(4, size // 8))
            y0 = int(rng.integers(size // 8, size // 3))
            x1 = x0 + int(rng.integers(size // 4, size // 2 - size // 8))
            y1 = y0 + int(rng.integers(size // 3, size // 2))
            draw.ellipse((x0, y0, x1, y1), fill=colour)
            boxes.append((float(x0), float(y0), float(x1), float(y1)))
        images.append(image)
        layouts.append(boxes)
    return images, layouts


def references(size: int, per_subject: int, seed: int) -> list[SubjectReferences]:
    rng = np.random.default_rng(seed)
    subjects = []
    for noun, colour in zip(NOUNS, COLOURS, strict=True):
        photos = []
        for _ in range(per_subject):
            image = Image.fromarray(rng.integers(150, 240, (size, size, 3), dtype=np.uint8))
            ImageDraw.Draw(image).ellipse((size // 4, size // 6, 3 * size // 4, 5 * size // 6), fill=colour)
            photos.append(image)
        subjects.append(SubjectReferences(noun, noun, photos))
    return subjects


def timed(run: Callable[[], list[DncRecord]]) -> tuple[float, list[DncRecord]]:
    started = time.perf_counter()
    records = run()
    return time.perf_counter() - started, records


def bench_detector(
    detector: LayoutDetector | OwlDetector,
    images: Sequence[Image.Image],
    layouts: Sequence[Sequence[Box]],
    subjects: Sequence[SubjectReferences],
    embedders: dict[str, Embedder],
    batch: int,
    repeats: int,
) -> dict:
    refs = embed_all_references(embedders, subjects)

    def batched() -> list[DncRecord]:
        return score_images(images, subjects, detector, embedders, batch_size=batch, layout_boxes=layouts,
                            reference_embeddings=refs)  # fmt: skip

    def one_by_one() -> list[DncRecord]:
        return score_images_one_by_one(images, subjects, detector, embedders, layout_boxes=layouts,
                                       reference_embeddings=refs)  # fmt: skip

    # Warm-up: first calls pay for lazy initialisation (oneDNN primitives, processor set-up).
    score_images(images[:batch], subjects, detector, embedders, batch_size=batch, layout_boxes=layouts[:batch],
                 reference_embeddings=refs)  # fmt: skip
    score_images_one_by_one(images[:2], subjects, detector, embedders, layout_boxes=layouts[:2],
                            reference_embeddings=refs)  # fmt: skip
    batched_s, single_s = [], []
    records_b: list[DncRecord] = []
    records_1: list[DncRecord] = []
    for _ in range(repeats):
        elapsed, records_b = timed(batched)
        batched_s.append(elapsed)
        elapsed, records_1 = timed(one_by_one)
        single_s.append(elapsed)
    score_diff = max(abs(a.score - b.score) for a, b in zip(records_b, records_1, strict=True))
    mudi = [r for r in records_b if r.mode == "mudi"]
    default = [r for r in records_b if r.mode == "default"]
    b_med, s_med = statistics.median(batched_s), statistics.median(single_s)
    return {
        "detector": detector.label,
        "images_per_s_batched": len(images) / b_med,
        "images_per_s_one_by_one": len(images) / s_med,
        "speedup": s_med / b_med,
        "batched_s": batched_s,
        "one_by_one_s": single_s,
        "mean_boxes_per_image_mudi": float(np.mean([r.n_boxes for r in mudi])),
        "mean_boxes_per_image_default": float(np.mean([r.n_boxes for r in default])),
        "count_gate_pass_rate": float(np.mean([r.reason is None for r in records_b])),
        "max_abs_score_diff_batched_vs_one_by_one": score_diff,
        "records": len(records_b),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16, help="images per batch in the batched run")
    parser.add_argument("--refs", type=int, default=3, help="reference photos per subject")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine usable)")
    parser.add_argument("--owl-threshold", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images, layouts = generated_like(args.images, args.size, args.seed)
    subjects = references(args.size, args.refs, args.seed + 1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-dnc-") as root:
        build_tiny_dinov2(Path(root) / "dinov2")
        build_tiny_clip(Path(root) / "clip")
        build_tiny_owlv2(Path(root) / "owlv2")
        # Embedder batch: every crop of a 16-image batch in one forward (the crops are tiny models' inputs).
        crop_batch = 64
        embedders: dict[str, Embedder] = {
            "dinov2": Dinov2Embedder(str(Path(root) / "dinov2"), batch_size=crop_batch),
            "clip": ClipImageEmbedder(str(Path(root) / "clip"), batch_size=crop_batch),
        }
        detectors = [
            LayoutDetector(),
            OwlDetector(str(Path(root) / "owlv2"), threshold=args.owl_threshold, batch_size=args.batch),
        ]
        results = [
            bench_detector(detector, images, layouts, subjects, embedders, args.batch, args.repeats)
            for detector in detectors
        ]

    import transformers

    payload = {
        "benchmark": "dnc_cpu",
        "command": " ".join(["python -m benchmarks.bench_dnc", *(argv if argv is not None else sys.argv[1:])]),
        "config": {
            "images": args.images,
            "size": args.size,
            "batch": args.batch,
            "refs_per_subject": args.refs,
            "subjects": len(subjects),
            "repeats": args.repeats,
            "embedders": list(embedders),
            "embedder_crop_batch": crop_batch,
            "modes": ["default", "mudi"],
            "owl_threshold": args.owl_threshold,
            "models": "tiny random-init (pipeline.models.tiny_embedders, tiny_vision.build_tiny_owlv2)",
        },
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_before": [round(v, 2) for v in load_before],
            "load_avg_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{'detector':<24} {'batched img/s':>14} {'1-by-1 img/s':>13} {'speedup':>8} {'boxes (mudi)':>13}")
    for row in results:
        print(
            f"{row['detector']:<24} {row['images_per_s_batched']:>14.1f} {row['images_per_s_one_by_one']:>13.1f} "
            f"{row['speedup']:>7.2f}x {row['mean_boxes_per_image_mudi']:>13.1f}"
        )
    return payload


if __name__ == "__main__":
    main()
