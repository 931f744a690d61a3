"""Choose a segmentation backend by name."""

from __future__ import annotations

import torch

from pipeline.errors import CastloraError
from pipeline.segment.base import SegmentConfig, Segmenter

BACKENDS = ("owlv2_sam", "grabcut", "ultralytics")


def create_segmenter(
    backend: str,
    *,
    detector_source: str,
    sam_source: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: SegmentConfig | None = None,
) -> Segmenter:
    """Build the named segmenter. Model sources are already-resolved ids or directories."""
    config = config or SegmentConfig()
    if backend == "owlv2_sam":
        from pipeline.segment.owl_sam import OwlSamSegmenter

        return OwlSamSegmenter(detector_source, sam_source, device=device, dtype=dtype, config=config)
    if backend == "grabcut":
        from pipeline.segment.grabcut import GrabCutSegmenter

        return GrabCutSegmenter(config)
    if backend == "ultralytics":
        return _create_ultralytics(detector_source, sam_source, device, config)
    raise CastloraError(
        f"Unknown segmentation backend {backend!r}; choose one of {', '.join(BACKENDS)} "
        "(set segmenter_backend in the model preset or the run config)."
    )


def _create_ultralytics(detector_source: str, sam_source: str, device: str, config: SegmentConfig) -> Segmenter:
    # Imported here: ultralytics is heavy, and pipeline.segment.ultra explains a missing install itself.
    from pipeline.segment.ultra import create_ultralytics_segmenter

    return create_ultralytics_segmenter(
        detector_source=detector_source, sam_source=sam_source, device=device, config=config
    )
