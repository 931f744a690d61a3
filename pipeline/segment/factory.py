"""Choose a segmentation backend by name."""

from __future__ import annotations

import importlib

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
    """Imported lazily: the module and the ``ultralytics`` package are optional."""
    try:
        module = importlib.import_module("pipeline.segment.ultra")
    except ModuleNotFoundError as exc:
        missing = exc.name or "pipeline.segment.ultra"
        raise CastloraError(
            f"Segmentation backend 'ultralytics' is not available: module {missing!r} could not be imported. "
            "Install the extra with `pip install castlora[ultralytics]`, or choose backend "
            "'owlv2_sam' or 'grabcut'."
        ) from exc
    factory = getattr(module, "create_ultralytics_segmenter", None) or getattr(module, "UltralyticsSegmenter", None)
    if factory is None:
        raise CastloraError(
            "Segmentation backend 'ultralytics': pipeline.segment.ultra defines neither "
            "create_ultralytics_segmenter nor UltralyticsSegmenter; choose backend 'owlv2_sam' or 'grabcut'."
        )
    return factory(detector_source=detector_source, sam_source=sam_source, device=device, config=config)
