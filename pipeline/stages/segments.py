"""Stage 2: subject masks and RGBA cut-outs per reference photo (user masks first, else the segmenter).

Photos whose subject is not found are kept in the manifest with their status, never silently dropped:
the asset check reports them and the user can supply a mask by hand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.segment import SegmentConfig, Segmenter
from pipeline.segment.files import write_segment
from pipeline.segment.user_masks import find_user_mask, segment_with_user_masks
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.manifest import prune_unlisted, write_manifest


def run_segments(
    *,
    references: pd.DataFrame,
    masks_dirs: dict[str, str | None],
    out_dir: Path,
    load_segmenter: Callable[[], Segmenter],
    config: SegmentConfig,
    recorder: LineageRecorder,
    model_ids: Sequence[str] = (),
    confine_to: str | None = None,
) -> pd.DataFrame:
    """Segment every photo of the references manifest; ``masks_dirs``: character id → user mask folder, whose
    masks must stay inside ``confine_to`` (an inbox pair folder) when it is given."""
    rows: list[dict] = []
    written: set[Path] = set()
    params = asdict(config)
    load_segmenter = functools.cache(load_segmenter)  # load at most once, and only if a photo needs it
    for (character_id, class_noun), group in references.groupby(["character_id", "class_noun"], sort=False):
        records = group.to_dict("records")
        images = [Image.open(r["path"]).convert("RGB") for r in records]
        masks_dir = masks_dirs.get(character_id)
        confine = Path(confine_to) if confine_to else None
        user_masks = [
            find_user_mask(Path(masks_dir), Path(r["source"]), confine) if masks_dir else None for r in records
        ]
        results = segment_with_user_masks(load_segmenter, images, user_masks, class_noun, config)
        for record, image, result, user_mask in zip(records, images, results, user_masks, strict=True):
            stem = out_dir / character_id / record["sha256"][:16]
            ids = () if user_mask is not None else model_ids
            row = write_segment(result, image, stem, record["sha256"], recorder, params, ids)
            written.update(Path(row[k]) for k in ("mask_path", "cutout_path") if row[k])
            rows.append(
                {
                    "character_id": character_id,
                    "class_noun": class_noun,
                    "token_phrase": record["token_phrase"],
                    "reference_path": record["path"],
                    "reference_sha256": record["sha256"],
                    "source": record["source"],
                    "user_mask": str(user_mask) if user_mask else None,
                    **row,
                }
            )
    manifest = pd.DataFrame(rows)
    write_manifest(manifest, out_dir)
    prune_unlisted(out_dir, written)
    return manifest
