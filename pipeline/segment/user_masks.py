"""Hand-made masks: when a user supplies one for a photo, it replaces whatever the segmenter would produce."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import SegmentationError
from pipeline.images import IMAGE_SUFFIXES
from pipeline.segment.base import SegmentConfig, Segmenter, SegmentResult, mask_status
from pipeline.segment.masks import mask_bbox
from pipeline.storage.paths import confined_path

LABEL = "user mask"
ASPECT_TOLERANCE = 0.01
"""Relative aspect-ratio difference above which a mask cannot belong to the photo (a resize is fine)."""


def user_mask_candidates(stem: str) -> tuple[str, ...]:
    """File stems accepted for a photo's mask, most specific first."""
    return (stem, f"{stem}_mask", f"mask_{stem}")


def find_user_mask(masks_dir: Path, photo_path: Path, confine_to: Path | None = None) -> Path | None:
    """The user's mask for ``photo_path``: same stem, ``<stem>_mask`` or ``mask_<stem>``; any image type.

    ``confine_to`` (an inbox pair folder) is re-checked for the mask found, right before it is read."""
    masks_dir, photo_path = Path(masks_dir), Path(photo_path)
    if not masks_dir.is_dir():
        return None
    by_stem: dict[str, list[Path]] = {}
    for candidate in sorted(masks_dir.iterdir()):
        if candidate.is_file() and candidate.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(candidate.stem, []).append(candidate)
    for stem in user_mask_candidates(photo_path.stem):
        for candidate in by_stem.get(stem, []):
            if not _same_file(candidate, photo_path):  # the masks folder may also hold the photos
                if confine_to is not None:
                    confined_path(candidate, Path(confine_to), "User mask")
                return candidate
    return None


def user_mask_result(
    mask_path: Path, image_size: tuple[int, int], config: SegmentConfig | None = None
) -> SegmentResult:
    """Read a user mask (>128 is subject, MuDI's convention) for a photo of ``image_size`` = (width, height).

    Masks at another resolution are resized with NEAREST; a different aspect ratio means the mask belongs to
    another picture (or a crop), which is an error rather than something to stretch.
    """
    config = config or SegmentConfig()
    mask_path = Path(mask_path)
    width, height = image_size
    gray = _read_mask_image(mask_path)
    photo_aspect = width / height
    mask_aspect = gray.width / gray.height
    if abs(mask_aspect - photo_aspect) / photo_aspect > ASPECT_TOLERANCE:
        raise SegmentationError(
            f"User mask {mask_path} is {gray.width}x{gray.height} but its photo is {width}x{height}: the "
            "aspect ratios differ, so the mask was drawn for another image or a crop. Export the mask at "
            "the photo's size (or the same aspect ratio), or remove it to use automatic segmentation."
        )
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.NEAREST)
    mask = np.asarray(gray) > 128
    bbox = mask_bbox(mask)
    return SegmentResult(
        mask=mask,
        box=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])) if bbox else None,
        detection_score=None,
        mask_score=None,
        n_boxes=1 if bbox else 0,
        segmenter=LABEL,
        status=mask_status(mask, config),
    )


def segment_with_user_masks(
    load_segmenter: Callable[[], Segmenter],
    images: Sequence[Image.Image],
    user_masks: Sequence[Path | None],
    class_noun: str,
    config: SegmentConfig | None = None,
) -> list[SegmentResult]:
    """Photo i takes ``user_masks[i]`` when it is a file (see ``find_user_mask``); the rest go through the
    segmenter, which is loaded only when at least one photo needs it."""
    if len(images) != len(user_masks):
        raise ValueError(f"{len(images)} images but {len(user_masks)} user-mask entries")
    results: list[SegmentResult | None] = [
        user_mask_result(mask_path, image.size, config) if mask_path else None
        for image, mask_path in zip(images, user_masks, strict=True)
    ]
    pending = [index for index, result in enumerate(results) if result is None]
    if pending:
        segmented = load_segmenter().segment([images[index] for index in pending], class_noun)
        for index, result in zip(pending, segmented, strict=True):
            results[index] = result
    return [result for result in results if result is not None]


def _read_mask_image(mask_path: Path) -> Image.Image:
    """Grayscale mask; an RGBA cut-out with real transparency is read through its alpha channel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(mask_path) as opened:
                opened.load()
                if opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info:
                    alpha = opened.convert("RGBA").getchannel("A")
                    if alpha.getextrema()[0] < 255:
                        return alpha
                return opened.convert("L")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise SegmentationError(
            f"User mask {mask_path} is not a readable image ({type(exc).__name__}: {exc}). Save it as a "
            "grayscale PNG (white = subject) or remove it to use automatic segmentation."
        ) from exc


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
