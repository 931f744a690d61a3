"""Stage 3: one caption per reference photo, token phrase in place of the class noun.

Captions are also written as kohya-style sidecar ``.txt`` files so other trainers can read the set.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.captions import CaptionCache, Captioner, caption_image
from pipeline.hashing import sha256_bytes
from pipeline.lineage import LineageRecorder
from pipeline.manifest import prune_unlisted, write_manifest


def run_captions(
    references: pd.DataFrame,
    out_dir: Path,
    captioner: Captioner,
    cache: CaptionCache,
    recorder: LineageRecorder,
) -> pd.DataFrame:
    rows: list[dict] = []
    written: set[Path] = set()
    model_ids = [captioner.model] if captioner.model else []
    for record in references.to_dict("records"):
        with Image.open(record["path"]) as opened:
            image = opened.convert("RGB")
        result = caption_image(captioner, cache, image, record["sha256"], record["class_noun"], record["token_phrase"])
        path = out_dir / record["character_id"] / f"{record['sha256'][:16]}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = result.text.encode("utf-8")
        path.write_bytes(data)
        written.add(path)
        sha = sha256_bytes(data)
        recorder.record(
            path,
            sha,
            [record["sha256"]],
            {
                "backend": captioner.backend,
                "prompt_version": captioner.prompt_version,
                "cached": result.cached,
            },
            model_ids,
        )
        rows.append(
            {
                "character_id": record["character_id"],
                "reference_sha256": record["sha256"],
                "reference_path": record["path"],
                "caption": result.text,
                "raw_caption": result.raw,
                "backend": captioner.backend,
                "model": captioner.model,
                "prompt_version": captioner.prompt_version,
                "cached": result.cached,
                "caption_path": str(path),
                "caption_sha256": sha,
            }
        )
    manifest = pd.DataFrame(rows)
    write_manifest(manifest, out_dir)
    prune_unlisted(out_dir, written)
    return manifest
