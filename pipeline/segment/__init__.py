"""Subject segmentation (docs/design.md#segmentation): OWLv2 + SAM, a labelled GrabCut fallback and user masks."""

from pipeline.segment.base import (
    STATUS_NO_DETECTION,
    STATUS_OK,
    STATUS_TINY_MASK,
    SegmentConfig,
    Segmenter,
    SegmentResult,
)
from pipeline.segment.boxes import nms, owlv2_target_size
from pipeline.segment.factory import BACKENDS, create_segmenter
from pipeline.segment.grabcut import GrabCutSegmenter
from pipeline.segment.masks import clean_mask, cutout_rgba, mask_bbox
from pipeline.segment.owl_sam import OwlSamSegmenter
from pipeline.segment.user_masks import find_user_mask, segment_with_user_masks, user_mask_result

__all__ = [
    "BACKENDS",
    "STATUS_NO_DETECTION",
    "STATUS_OK",
    "STATUS_TINY_MASK",
    "GrabCutSegmenter",
    "OwlSamSegmenter",
    "SegmentConfig",
    "SegmentResult",
    "Segmenter",
    "clean_mask",
    "create_segmenter",
    "cutout_rgba",
    "find_user_mask",
    "mask_bbox",
    "nms",
    "owlv2_target_size",
    "segment_with_user_masks",
    "user_mask_result",
]
