"""Mask clean-up and RGBA cut-outs."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def clean_mask(mask: np.ndarray, fill_holes: bool = True, keep_largest: bool = True) -> np.ndarray:
    """Bool mask with interior holes filled and only the largest 8-connected component kept.

    SAM masks often have pinholes (eyes, specular highlights) and stray specks; Seg-Mix pastes the whole mask,
    so both would show up as artefacts.
    """
    cleaned = np.asarray(mask).astype(bool)
    if keep_largest and cleaned.any():
        labels, count = ndimage.label(cleaned, structure=np.ones((3, 3), dtype=bool))
        if count > 1:
            sizes = ndimage.sum_labels(cleaned, labels, index=np.arange(1, count + 1))
            cleaned = labels == (int(np.argmax(sizes)) + 1)
    if fill_holes and cleaned.any():
        cleaned = ndimage.binary_fill_holes(cleaned)
    return np.asarray(cleaned, dtype=bool)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the mask's True pixels, x1/y1 exclusive; None for an empty mask."""
    mask = np.asarray(mask).astype(bool)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def cutout_rgba(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The subject as RGBA cropped to its mask bbox: alpha = mask * 255, colour outside the mask zeroed."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"cutout_rgba: mask is {mask.shape[::-1]} (w, h) but the image is {image.size}")
    bbox = mask_bbox(mask)
    if bbox is None:
        raise ValueError("cutout_rgba: the mask is empty, there is no subject to cut out")
    x0, y0, x1, y1 = bbox
    rgb = np.asarray(image.convert("RGB"))[y0:y1, x0:x1]
    alpha = mask[y0:y1, x0:x1]
    rgba = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.where(alpha[..., None], rgb, 0)
    rgba[..., 3] = alpha.astype(np.uint8) * 255
    return Image.fromarray(rgba)  # uint8 HxWx4 is read as RGBA
