"""Find the characters in a generated image for Detect-and-Compare (docs/design.md#detection).

``OwlDetector`` runs OWLv2 with one text query per class noun, built from the D&C mode's query template (MuDI's
mode: the bare noun ``dog``; the default mode: ``a photo of a dog``); ``LayoutDetector`` is a labelled fallback that
returns the generation layout's boxes, for random-init tiny models whose detections mean nothing. Both return
``BoxDetection``s in the image's own pixels and carry a ``label`` recorded with every score; ``queries`` says
which texts a detection sends (recorded with every score too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from pipeline.dnc.metric import CLASS_NOUN_FIELD, PHOTO_QUERY
from pipeline.errors import CastloraError
from pipeline.images import to_rgb
from pipeline.models.inputs import index_chunks, to_device
from pipeline.models.loading import load_pretrained
from pipeline.segment.boxes import clip_boxes, nms, scale_normalized_boxes
from pipeline.segment.owl_sam import _require_existing_dir, _require_model_type

Box = tuple[float, float, float, float]
OWL_LABEL = "owlv2"
LAYOUT_LABEL = "layout (no detector)"
LAYOUT_UNMATCHED = "layout"
"""Label of layout boxes whose count differs from the subjects' (no box-to-noun correspondence to claim)."""
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class BoxDetection:
    box: Box
    """x0, y0, x1, y1 in pixels of the scored image (float)."""
    score: float
    label: str
    """The class noun of the best-matching query (a layout box: its subject's noun)."""


class Detector(Protocol):
    label: str
    model_id: str

    def queries(self, class_nouns: Sequence[str], query_template: str = PHOTO_QUERY) -> list[str]: ...

    def detect(
        self,
        images: Sequence[Image.Image],
        class_nouns: Sequence[str],
        nms: bool = False,
        layout_boxes: Sequence[Sequence[Box]] | None = None,
        query_template: str = PHOTO_QUERY,
    ) -> list[list[BoxDetection]]: ...


def suppress_overlaps(detections: Sequence[BoxDetection], iou: float) -> list[BoxDetection]:
    """Class-agnostic NMS (two nouns can fire on the same character); survivors highest score first."""
    if len(detections) == 0:
        return []
    boxes = np.asarray([d.box for d in detections], dtype=np.float64)
    scores = np.asarray([d.score for d in detections], dtype=np.float64)
    return [detections[int(i)] for i in nms(boxes, scores, iou)]


def unique_nouns(class_nouns: Sequence[str]) -> list[str]:
    nouns = list(dict.fromkeys(noun.strip() for noun in class_nouns if noun and noun.strip()))
    if not nouns:
        raise CastloraError("D&C detection needs at least one non-empty class noun (the subjects' class_noun).")
    return nouns


def query_texts(class_nouns: Sequence[str], query_template: str) -> list[str]:
    """One text query per unique class noun: ``query_template`` with ``{class_noun}`` replaced."""
    if CLASS_NOUN_FIELD not in query_template:
        raise CastloraError(f"D&C query template must contain {CLASS_NOUN_FIELD}; got {query_template!r}.")
    return [query_template.replace(CLASS_NOUN_FIELD, noun) for noun in unique_nouns(class_nouns)]


class OwlDetector:
    """OWLv2 with one text query per unique class noun; each box keeps its best query's score and noun."""

    label = OWL_LABEL

    def __init__(
        self,
        source: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        threshold: float = 0.4,
        nms_iou: float = 0.5,
        batch_size: int = 8,
    ) -> None:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        what = "D&C OWLv2 detector"
        _require_existing_dir(source, what)
        _require_model_type(source, "owlv2", what)
        self.model_id = str(source)
        self.device = torch.device(device)
        self.dtype = dtype
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)
        self.batch_size = max(1, int(batch_size))
        self.processor = load_pretrained(Owlv2Processor.from_pretrained, source, what)
        self.model = load_pretrained(Owlv2ForObjectDetection.from_pretrained, source, what, dtype=dtype)
        self.model.to(self.device).eval()

    def queries(self, class_nouns: Sequence[str], query_template: str = PHOTO_QUERY) -> list[str]:
        return query_texts(class_nouns, query_template)

    def detect(
        self,
        images: Sequence[Image.Image],
        class_nouns: Sequence[str],
        nms: bool = False,
        layout_boxes: Sequence[Sequence[Box]] | None = None,
        query_template: str = PHOTO_QUERY,
    ) -> list[list[BoxDetection]]:
        """Per image, the boxes scoring above the threshold (patch order; with ``nms``, NMS survivors). The text
        queries are ``queries(class_nouns, query_template)``; each box is labelled with its best query's noun.

        ``layout_boxes`` is accepted for interface symmetry with ``LayoutDetector`` and ignored.
        """
        nouns = unique_nouns(class_nouns)
        queries = query_texts(nouns, query_template)
        rgb = [to_rgb(image) for image in images]
        found: list[list[BoxDetection]] = []
        for batch in index_chunks(len(rgb), self.batch_size):
            found.extend(self._detect_batch([rgb[i] for i in batch], nouns, queries))
        if nms:
            found = [suppress_overlaps(per_image, self.nms_iou) for per_image in found]
        return found

    @torch.inference_mode()
    def _detect_batch(
        self, images: list[Image.Image], nouns: list[str], queries: list[str]
    ) -> list[list[BoxDetection]]:
        inputs = self.processor(text=[queries] * len(images), images=images, return_tensors="pt", truncation=True)
        outputs = self.model(**to_device(inputs, self.device, self.dtype))
        # logits: (images, patches, queries). Scores and boxes in float32 so half precision costs no pixels.
        logits = outputs.logits.float()
        scores = torch.sigmoid(logits.amax(dim=-1)).cpu().numpy()
        best_query = logits.argmax(dim=-1).cpu().numpy()
        boxes = outputs.pred_boxes.float().cpu().numpy()
        results = []
        for image, image_scores, image_queries, image_boxes in zip(images, scores, best_query, boxes, strict=True):
            keep = np.flatnonzero(image_scores > self.threshold)
            # Boxes are relative to OWLv2's padded square; scale by its side, not by (w, h), then clip.
            pixel_boxes = scale_normalized_boxes(image_boxes[keep], image.width, image.height)
            detections = [
                BoxDetection(tuple(float(v) for v in box), float(image_scores[k]), nouns[int(image_queries[k])])
                for k, box in zip(keep, pixel_boxes, strict=True)
                if box[2] > box[0] and box[3] > box[1]
            ]
            results.append(detections)
        return results


class LayoutDetector:
    """No detection: the boxes the image was generated with, score 1.0 (labelled, for random-init models).

    Layout box k belongs to subject k when the counts match, and is labelled with that subject's noun; otherwise
    the boxes are labelled ``"layout"`` (and D&C's count gate will fail the image anyway).
    """

    label = LAYOUT_LABEL
    model_id = ""

    def __init__(self, nms_iou: float = 0.5) -> None:
        self.nms_iou = float(nms_iou)

    def queries(self, class_nouns: Sequence[str], query_template: str = PHOTO_QUERY) -> list[str]:
        """None: the layout's boxes are returned, no text is sent anywhere."""
        return []

    def detect(
        self,
        images: Sequence[Image.Image],
        class_nouns: Sequence[str],
        nms: bool = False,
        layout_boxes: Sequence[Sequence[Box]] | None = None,
        query_template: str = PHOTO_QUERY,
    ) -> list[list[BoxDetection]]:
        if layout_boxes is None or len(layout_boxes) != len(images):
            given = "none" if layout_boxes is None else len(layout_boxes)
            raise CastloraError(
                f"The layout D&C detector needs the generation layout's boxes for every image: {len(images)} "
                f"images, {given} box lists. Pass layout_boxes, or use the owlv2 detector (model preset dnc_detector)."
            )
        nouns = [noun.strip() for noun in class_nouns]
        found = []
        for image, boxes in zip(images, layout_boxes, strict=True):
            clipped = clip_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), image.width, image.height)
            labels = nouns if len(clipped) == len(nouns) else [LAYOUT_UNMATCHED] * len(clipped)
            detections = [
                BoxDetection(tuple(float(v) for v in box), 1.0, label)
                for box, label in zip(clipped, labels, strict=True)
            ]
            found.append(suppress_overlaps(detections, self.nms_iou) if nms else detections)
        return found


def crop_to_square(image: Image.Image, box: Box, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """The box's pixels (rounded outwards, ≥ 1 px), centred on a square of ``fill`` (docs/design.md#detection)."""
    image = to_rgb(image)
    x0, y0, x1, y1 = box
    left = min(max(math.floor(x0), 0), image.width - 1)
    top = min(max(math.floor(y0), 0), image.height - 1)
    right = max(min(math.ceil(x1), image.width), left + 1)
    bottom = max(min(math.ceil(y1), image.height), top + 1)
    crop = image.crop((left, top, right, bottom))
    side = max(crop.width, crop.height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square
