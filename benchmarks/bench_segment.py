"""Segmentation throughput (OWLv2 → SAM) with full-size random-init models, for GPU sizing.

Step time does not depend on weight values, so full-size models built from the real configs
(OWLv2 base/16 at 960 px, SAM ViT-B or ViT-H at 1024 px) measure what the real checkpoints cost. The
models are saved to a temporary folder and loaded through ``OwlSamSegmenter`` exactly as real weights are.

    python -m benchmarks.bench_segment --device cuda --dtype float16 --sam vit-h
    python -m benchmarks.bench_segment --device cpu --images 4 --batch 2       # slow, sanity only

Writes ``benchmarks/results/segment-<device>-<dtype>-<sam>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from pipeline.models.tokenizers import write_tiny_clip_tokenizer  # noqa: E402
from pipeline.segment import SegmentConfig  # noqa: E402
from pipeline.segment.owl_sam import OwlSamSegmenter  # noqa: E402

SAM_SIZES = {
    "vit-b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "vit-h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}


def build_full_size(folder: Path, sam: str) -> tuple[Path, Path]:
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
    )

    owl_dir, sam_dir, vocab_dir = folder / "owlv2", folder / "sam", folder / "vocab"
    write_tiny_clip_tokenizer(vocab_dir, model_max_length=16, pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir)
    torch.manual_seed(0)
    # Owlv2Config's defaults are the base model's widths; the 960 px input is set below; the vocabulary is ours.
    owl = Owlv2ForObjectDetection(
        Owlv2Config(
            text_config={
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={"image_size": 960, "patch_size": 16},  # owlv2-base-patch16-ensemble
        )
    )
    with torch.no_grad():  # random box heads give zero-area boxes; zeroed, each patch predicts its own cell
        owl.box_head.dense2.weight.zero_()
        owl.box_head.dense2.bias.zero_()
    owl.half().save_pretrained(owl_dir)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(), tokenizer=tokenizer).save_pretrained(owl_dir)
    SamModel(SamConfig(vision_config=SAM_SIZES[sam])).half().save_pretrained(sam_dir)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(sam_dir)
    return owl_dir, sam_dir


def photos(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (512, 640, 3), dtype=np.uint8)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--sam", default="vit-h", choices=sorted(SAM_SIZES))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="castlora-seg-bench-") as tmp:
        t0 = time.perf_counter()
        owl_dir, sam_dir = build_full_size(Path(tmp), args.sam)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        segmenter = OwlSamSegmenter(
            str(owl_dir),
            str(sam_dir),
            device=args.device,
            dtype=getattr(torch, args.dtype),
            config=SegmentConfig(detection_threshold=0.0),
            batch_size=args.batch,
        )
        loaded = time.perf_counter() - t0
    images = photos(args.images)
    segmenter.segment(images[: args.batch], "dog")  # warm-up: kernels, allocator
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        results = segmenter.segment(images, "dog")
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    statuses = sorted({r.status for r in results})
    record = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "sam": args.sam,
        "images": args.images,
        "batch": args.batch,
        "image_size": "640x512",
        "seconds_best": round(best, 3),
        "images_per_s": round(args.images / best, 2),
        "all_runs_s": [round(t, 3) for t in times],
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "build_s": round(built, 1),
        "load_s": round(loaded, 1),
        "statuses": statuses,
        "torch": torch.__version__,
    }
    print(json.dumps(record, indent=2))
    out = _REPO / "benchmarks" / "results" / f"segment-{args.device.split(':')[0]}-{args.dtype}-{args.sam}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
