"""A ready-to-use D&C scorer for one pair: detector, embedders and the characters' reference embeddings, loaded once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.dnc.detect import Box, Detector, LayoutDetector, OwlDetector
from pipeline.dnc.embed import EMBEDDER_NAMES, Embedder, load_embedders
from pipeline.dnc.image_scores import (
    DEFAULT_MODES,
    SubjectReferences,
    embed_all_references,
    records_to_frame,
    score_images,
)
from pipeline.errors import CastloraError
from pipeline.models.loading import resolve_model

DETECTORS = ("owlv2", "layout")


class ImageScorer(Protocol):
    """What the iteration and the evaluation need of a D&C scorer (``DncScorer``; tests pass simpler ones)."""

    def score(self, images: Sequence[Image.Image], layout_boxes: Sequence[Sequence[Sequence[float]]]) -> pd.DataFrame:
        """One row per (image, embedder, mode): image_index, embedder, mode, score, reason, boxes_json, ..."""
        ...

    def embed(self, images: Sequence[Image.Image], embedder: str) -> np.ndarray: ...


@dataclass
class DncScorer:
    subjects: Sequence[SubjectReferences]
    detector: Detector
    embedders: Mapping[str, Embedder]
    unavailable: dict[str, str] = field(default_factory=dict)
    """Embedder name -> why it could not be loaded (reported as such, never replaced)."""
    modes: Sequence[str] = DEFAULT_MODES
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.embedders:
            reasons = "; ".join(f"{k}: {v}" for k, v in self.unavailable.items()) or "none requested"
            raise CastloraError(f"D&C has no available embedder ({reasons}). Configure dino or clip in the preset.")
        self.reference_embeddings = embed_all_references(self.embedders, self.subjects)

    @property
    def model_ids(self) -> list[str]:
        ids = [getattr(self.detector, "model_id", "")] + [getattr(e, "model_id", "") for e in self.embedders.values()]
        return [i for i in ids if i]

    def score(self, images: Sequence[Image.Image], layout_boxes: Sequence[Sequence[Box]]) -> pd.DataFrame:
        records = score_images(
            images,
            self.subjects,
            self.detector,
            self.embedders,
            modes=self.modes,
            batch_size=self.batch_size,
            layout_boxes=layout_boxes,
            reference_embeddings=self.reference_embeddings,
        )
        return records_to_frame(records)

    def embed(self, images: Sequence[Image.Image], embedder: str) -> np.ndarray:
        if embedder not in self.embedders:
            why = self.unavailable.get(embedder, f"not one of the loaded embedders {sorted(self.embedders)}")
            raise CastloraError(f"Embedder {embedder!r} is unavailable: {why}.")
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        return self.embedders[embedder].embed(images)


def load_dnc_scorer(
    subjects: Sequence[SubjectReferences],
    detector: str,
    detector_source: str,
    threshold: float,
    embedder_sources: dict[str, str],
    cache_root: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    embedders: Sequence[str] = EMBEDDER_NAMES,
    batch_size: int = 16,
) -> DncScorer:
    """``detector`` is ``owlv2`` (``detector_source``: id, directory or ``tiny:owlv2``) or ``layout`` (fallback)."""
    if detector == "owlv2":
        source = resolve_model(detector_source, Path(cache_root), "D&C detector (OWLv2)")
        found: Detector = OwlDetector(source, device=device, dtype=dtype, threshold=threshold)
    elif detector == "layout":
        found = LayoutDetector()
    else:
        raise CastloraError(f"Unknown D&C detector {detector!r}; choose one of {DETECTORS}.")
    available, unavailable = load_embedders(embedders, embedder_sources, Path(cache_root), device, dtype, batch_size)
    return DncScorer(subjects, found, available, unavailable, batch_size=batch_size)


def references_from_manifest(references: pd.DataFrame, character_ids: Sequence[str]) -> list[SubjectReferences]:
    """The accepted reference photos of each character (in ``character_ids`` order) from the references manifest."""
    subjects = []
    for character_id in character_ids:
        rows = references[references["character_id"] == character_id]
        if rows.empty:
            raise CastloraError(
                f"Character {character_id!r} has no accepted reference photo in the references manifest; "
                "re-materialize 'references'."
            )
        images = []
        for path in rows["path"]:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
        subjects.append(SubjectReferences(character_id, str(rows["class_noun"].iloc[0]), images))
    return subjects
