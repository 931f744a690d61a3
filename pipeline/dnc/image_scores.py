"""Image-level Detect-and-Compare: detect, crop, embed, then the pure maths of ``pipeline.dnc.metric``.

Batching is where the time goes: the detector runs once per batch of images and distinct query set (modes that
send the same queries share one detection; NMS for the default mode is applied afterwards to the raw detections),
and every crop of the batch goes through each embedder in one call. References are embedded once per embedder and
reused for every image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.dnc.detect import Box, BoxDetection, Detector, crop_to_square
from pipeline.dnc.embed import Embedder
from pipeline.dnc.metric import DncMode, DncResult, dnc_from_similarities, get_mode, reference_gram
from pipeline.errors import CastloraError
from pipeline.images import to_rgb
from pipeline.segment.boxes import nms

DEFAULT_MODES = ("default", "mudi")
JSON_COLUMNS = ("boxes", "labels", "box_scores", "box_ref_sims", "S", "G", "assignment", "queries")
PLAIN_COLUMNS = ("image_index", "detector", "embedder", "mode", "n_boxes", "score", "reason")


@dataclass(frozen=True)
class SubjectReferences:
    subject_id: str
    class_noun: str
    images: Sequence[Image.Image]
    """Whole reference photos (MuDI embeds them uncropped)."""


@dataclass
class DncRecord:
    """One (image, embedder, mode) score with everything needed to audit it."""

    image_index: int
    detector: str
    embedder: str
    mode: str
    n_boxes: int
    boxes: list[list[float]]
    labels: list[str]
    box_scores: list[float]
    box_ref_sims: list[list[list[float]]]
    """[box][subject][reference] cosine similarities."""
    S: list[list[float]]
    G: list[list[float]]
    assignment: list[int] | None
    """Box index per subject; None when the count gate failed."""
    score: float
    reason: str | None = None
    queries: list[str] = field(default_factory=list)
    """The detector's text queries (one per class noun; empty for the layout detector, which sends none)."""


def embed_references(embedder: Embedder, subjects: Sequence[SubjectReferences]) -> list[np.ndarray]:
    """One ``(refs, d)`` array per subject, all photos in a single embedder call."""
    for subject in subjects:
        if len(subject.images) == 0:
            raise CastloraError(f"Subject {subject.subject_id!r} has no reference images to compare against.")
    photos = [photo for subject in subjects for photo in subject.images]
    rows = embedder.embed(photos)
    split_at = np.cumsum([len(subject.images) for subject in subjects])[:-1]
    return [np.asarray(part, dtype=np.float32) for part in np.split(rows, split_at)]


def embed_all_references(
    embedders: Mapping[str, Embedder], subjects: Sequence[SubjectReferences]
) -> dict[str, list[np.ndarray]]:
    """References of every subject for every embedder: compute once, pass to ``score_images`` for every batch."""
    return {name: embed_references(embedder, subjects) for name, embedder in embedders.items()}


def _kept_indices(detections: Sequence[BoxDetection], mode: DncMode, iou: float) -> list[int]:
    """Indices into the raw (no-NMS) detections that ``mode`` scores, in the order it sees them."""
    if not mode.nms or len(detections) == 0:
        return list(range(len(detections)))
    boxes = np.asarray([d.box for d in detections], dtype=np.float64)
    scores = np.asarray([d.score for d in detections], dtype=np.float64)
    return [int(i) for i in nms(boxes, scores, iou)]


def score_images(
    images: Sequence[Image.Image],
    subjects: Sequence[SubjectReferences],
    detector: Detector,
    embedders: Mapping[str, Embedder],
    modes: Sequence[str] = DEFAULT_MODES,
    batch_size: int = 16,
    layout_boxes: Sequence[Sequence[Box]] | None = None,
    reference_embeddings: Mapping[str, list[np.ndarray]] | None = None,
) -> list[DncRecord]:
    """D&C of every image for every embedder and mode; records ordered image, then embedder, then mode.

    ``layout_boxes`` (one list of xyxy boxes per image) is what ``LayoutDetector`` returns; ``reference_embeddings``
    (from ``embed_all_references``) skips re-embedding the references on repeated calls.
    """
    if not subjects:
        raise CastloraError("D&C needs at least one subject with reference images.")
    if layout_boxes is not None and len(layout_boxes) != len(images):
        raise CastloraError(f"layout_boxes has {len(layout_boxes)} entries for {len(images)} images.")
    dnc_modes = [get_mode(name) for name in modes]
    references = dict(reference_embeddings or {})
    for name, embedder in embedders.items():
        if name not in references:
            references[name] = embed_references(embedder, subjects)
    grams = {
        (name, mode.name): reference_gram(references[name], include_self=mode.include_self)
        for name in embedders
        for mode in dnc_modes
    }
    nouns = [subject.class_noun for subject in subjects]
    nms_iou = float(getattr(detector, "nms_iou", 0.5))
    batch_size = max(1, int(batch_size))

    # Each mode sends its own queries (MuDI's the bare nouns); modes sending the same ones share a detection.
    queries = {mode.name: tuple(detector.queries(nouns, mode.query_template)) for mode in dnc_modes}
    runs = {mode.name: list(dict.fromkeys(queries.values())).index(queries[mode.name]) for mode in dnc_modes}
    templates = {runs[mode.name]: mode.query_template for mode in dnc_modes}

    records: list[DncRecord] = []
    for start in range(0, len(images), batch_size):
        batch = [to_rgb(image) for image in images[start : start + batch_size]]
        batch_layout = None if layout_boxes is None else layout_boxes[start : start + len(batch)]
        # raw[run][image] = that detection run's boxes (no NMS)
        raw = [
            detector.detect(batch, nouns, nms=False, layout_boxes=batch_layout, query_template=templates[run])
            for run in sorted(templates)
        ]
        kept = [
            {mode.name: _kept_indices(raw[runs[mode.name]][offset], mode, nms_iou) for mode in dnc_modes}
            for offset in range(len(batch))
        ]

        # Crop every (run, box) some mode scores, then embed all crops of the batch in one call per embedder.
        crop_rows: list[dict[tuple[int, int], int]] = []
        crops: list[Image.Image] = []
        for offset, (image, per_mode) in enumerate(zip(batch, kept, strict=True)):
            needed = sorted({(runs[name], i) for name, indices in per_mode.items() for i in indices})
            crop_rows.append({key: len(crops) + k for k, key in enumerate(needed)})
            crops.extend(crop_to_square(image, raw[run][offset][i].box) for run, i in needed)

        # sims[name][image][(run, box index)] = that box's cosine similarities to each subject's references
        sims: dict[str, list[dict[tuple[int, int], list[np.ndarray]]]] = {}
        for name, embedder in embedders.items():
            crop_embeddings = embedder.embed(crops) if crops else np.zeros((0, 0), dtype=np.float32)
            sims[name] = [
                {key: [crop_embeddings[row] @ ref.T for ref in references[name]] for key, row in rows.items()}
                for rows in crop_rows
            ]
        for offset, per_mode in enumerate(kept):
            for name in embedders:
                for mode in dnc_modes:
                    run, indices = runs[mode.name], per_mode[mode.name]
                    dets = raw[run][offset]
                    box_ref_sims = [sims[name][offset][(run, i)] for i in indices]
                    result = dnc_from_similarities(
                        box_ref_sims, grams[(name, mode.name)], assignment=mode.assignment, norm=mode.norm
                    )
                    records.append(
                        _record(
                            start + offset,
                            detector.label,
                            name,
                            mode.name,
                            [dets[i] for i in indices],
                            box_ref_sims,
                            result,
                            list(queries[mode.name]),
                        )
                    )
    return records


def _record(
    image_index: int,
    detector: str,
    embedder: str,
    mode: str,
    detections: Sequence[BoxDetection],
    box_ref_sims: Sequence[Sequence[np.ndarray]],
    result: DncResult,
    queries: list[str],
) -> DncRecord:
    return DncRecord(
        image_index=image_index,
        detector=detector,
        embedder=embedder,
        mode=mode,
        n_boxes=len(detections),
        boxes=[[float(v) for v in d.box] for d in detections],
        labels=[d.label for d in detections],
        box_scores=[float(d.score) for d in detections],
        box_ref_sims=[[np.asarray(s, dtype=float).tolist() for s in per_subject] for per_subject in box_ref_sims],
        S=np.asarray(result.S, dtype=float).tolist(),
        G=np.asarray(result.G, dtype=float).tolist(),
        assignment=None if result.assignment is None else list(result.assignment),
        score=float(result.score),
        reason=result.reason,
        queries=queries,
    )


def score_images_one_by_one(
    images: Sequence[Image.Image],
    subjects: Sequence[SubjectReferences],
    detector: Detector,
    embedders: Mapping[str, Embedder],
    modes: Sequence[str] = DEFAULT_MODES,
    layout_boxes: Sequence[Sequence[Box]] | None = None,
    reference_embeddings: Mapping[str, list[np.ndarray]] | None = None,
) -> list[DncRecord]:
    """The unbatched baseline: one detector call and one embedder call per image (references still once)."""
    references = reference_embeddings or embed_all_references(embedders, subjects)
    return score_images(images, subjects, detector, embedders, modes, 1, layout_boxes, references)


def records_to_frame(records: Sequence[DncRecord]) -> pd.DataFrame:
    """Parquet-ready table: plain columns plus ``<name>_json`` strings for the nested values."""
    rows = []
    for record in records:
        row: dict[str, object] = {column: getattr(record, column) for column in PLAIN_COLUMNS}
        for column in JSON_COLUMNS:
            row[f"{column}_json"] = json.dumps(getattr(record, column))
        rows.append(row)
    columns = [*PLAIN_COLUMNS, *(f"{column}_json" for column in JSON_COLUMNS)]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype(
        {"image_index": "int64", "n_boxes": "int64", "score": "float64", "reason": "string"}
        | {c: "string" for c in ("detector", "embedder", "mode")}
    )
