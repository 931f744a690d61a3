"""OWLv2 text-prompted detection + SAM box-prompted masks (docs/design.md#segmentation, as in MuDI)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ModelLoadError
from pipeline.images import to_rgb
from pipeline.models.inputs import index_chunks, to_device
from pipeline.models.loading import load_pretrained
from pipeline.segment.base import Detection, SegmentConfig, SegmentResult, detected, no_detection
from pipeline.segment.boxes import best_detection, scale_normalized_boxes
from pipeline.segment.masks import clean_mask

LABEL = "owlv2+sam"


def detection_query(class_noun: str) -> str:
    """OWLv2 text query for a subject's class noun (CLIP-style prompt)."""
    return f"a photo of a {class_noun.strip()}"


class OwlSamSegmenter:
    """Finds the class noun with OWLv2, then asks SAM for a mask inside the best box."""

    label = LABEL

    def __init__(
        self,
        detector_source: str,
        sam_source: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: SegmentConfig | None = None,
        batch_size: int = 8,
    ) -> None:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor, SamModel, SamProcessor

        self.config = config or SegmentConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = max(1, batch_size)
        self.model_ids: tuple[str, ...] = (str(detector_source), str(sam_source))

        what_detector, what_sam = "OWLv2 detector", "SAM segmenter"
        _require_existing_dir(detector_source, what_detector)
        _require_existing_dir(sam_source, what_sam)
        _require_model_type(detector_source, "owlv2", what_detector)
        _require_model_type(sam_source, "sam", what_sam)
        self.detector_processor = load_pretrained(Owlv2Processor.from_pretrained, detector_source, what_detector)
        self.detector = load_pretrained(
            Owlv2ForObjectDetection.from_pretrained, detector_source, what_detector, dtype=dtype
        )
        self.sam_processor = load_pretrained(SamProcessor.from_pretrained, sam_source, what_sam)
        self.sam = load_pretrained(SamModel.from_pretrained, sam_source, what_sam, dtype=dtype)
        self.detector.to(self.device).eval()
        self.sam.to(self.device).eval()

    def segment(self, images: Sequence[Image.Image], class_noun: str) -> list[SegmentResult]:
        rgb_images = [to_rgb(image) for image in images]
        detections: list[Detection | None] = []
        for batch in index_chunks(len(rgb_images), self.batch_size):
            detections.extend(self.detect([rgb_images[i] for i in batch], class_noun))

        results: list[SegmentResult] = [no_detection(self.label) for _ in rgb_images]
        found = [(index, detection) for index, detection in enumerate(detections) if detection is not None]
        for batch in index_chunks(len(found), self.batch_size):
            chunk = [found[i] for i in batch]
            masks = self.masks_for_boxes([rgb_images[i] for i, _ in chunk], [d.box for _, d in chunk])
            for (index, detection), (mask, mask_score) in zip(chunk, masks, strict=True):
                results[index] = detected(detection, mask, mask_score, self.label, self.config)
        return results

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image], class_noun: str) -> list[Detection | None]:
        """One OWLv2 forward for all ``images``; boxes come back in each image's own pixels."""
        if not images:
            return []
        query = detection_query(class_noun)
        inputs = self.detector_processor(
            text=[[query]] * len(images), images=list(images), return_tensors="pt", truncation=True
        )
        outputs = self.detector(**to_device(inputs, self.device, self.dtype))
        # Scores and boxes in float32 (half precision would cost whole pixels on large photos). Boxes are
        # (cx, cy, w, h) relative to the padded square; scale_normalized_boxes maps them to real pixels.
        scores = torch.sigmoid(outputs.logits.float().amax(dim=-1)).cpu().numpy()
        boxes = outputs.pred_boxes.float().cpu().numpy()
        detections: list[Detection | None] = []
        for image, image_scores, image_boxes in zip(images, scores, boxes, strict=True):
            keep = image_scores > self.config.detection_threshold
            pixel_boxes = scale_normalized_boxes(image_boxes[keep], image.width, image.height)
            detections.append(best_detection(pixel_boxes, image_scores[keep], image.width, image.height, self.config))
        return detections

    @torch.inference_mode()
    def masks_for_boxes(
        self, images: Sequence[Image.Image], boxes: Sequence[tuple[float, float, float, float]]
    ) -> list[tuple[np.ndarray, float]]:
        """SAM prompted with one box per image; keeps the multimask output with the best predicted IoU."""
        if not images:
            return []
        inputs = self.sam_processor(
            images=list(images), input_boxes=[[list(box)] for box in boxes], return_tensors="pt"
        )
        outputs = self.sam(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
            multimask_output=True,
        )
        upsampled = self.sam_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        iou_scores = outputs.iou_scores.float().cpu()  # (batch, boxes=1, candidates)
        results: list[tuple[np.ndarray, float]] = []
        for image_masks, image_scores in zip(upsampled, iou_scores, strict=True):
            best = int(torch.argmax(image_scores[0]))
            mask = image_masks[0, best].numpy().astype(bool)
            mask = clean_mask(mask, self.config.fill_holes, self.config.keep_largest_component)
            results.append((mask, float(image_scores[0, best])))
        return results


def _require_existing_dir(source: str, what: str) -> None:
    """A path-like source that is not a folder gets a plain message instead of a hub repo-id error."""
    looks_like_path = source.startswith(("/", "./", "../", "~")) or Path(source).exists()
    path = Path(source).expanduser()
    if looks_like_path and not path.is_dir():
        raise ModelLoadError(
            f"{what}: model directory {path} does not exist. Point the model preset at a folder saved with "
            "save_pretrained."
        )


def _require_model_type(source: str, expected: str, what: str) -> None:
    """Check config.json first: transformers loads a mismatched checkpoint with a warning, random weights."""
    from transformers import PreTrainedConfig

    config_dict, _ = load_pretrained(PreTrainedConfig.get_config_dict, source, what)
    found = config_dict.get("model_type")
    if found is None:
        raise ModelLoadError(
            f"{what}: {source!r} has no config.json with a model_type; point the model preset at a folder "
            "saved with save_pretrained or at a Hugging Face id in the local cache."
        )
    if found != expected:
        raise ModelLoadError(
            f"{what}: {source!r} holds a {found!r} model, expected {expected!r}. "
            "Check the detector/sam settings of the model preset (are they swapped?)."
        )
