"""Baseline for the Seg-Mix benchmark: a naive Seg-Mix written from MuDI's Algorithm 1 and SPEC §4.

Like MuDI's training loop, every composite starts again from the *full-resolution* photo and its full-size
mask: find the mask's bbox, crop photo and mask, draw a scale U(0.75·max, max) for a half-canvas fit box
((512 - 32) x (1024 - 32)), resize photo and mask (PIL default filter), zero the pixels outside the mask,
paste one subject at x = randint(1, 256) and the other ending at 1024 - randint(1, 256), y uniform, the
second pasted wins overlaps, white background. Used only to time castlora's ``pipeline.segmix.compose`` against
this way of working; nothing in ``pipeline/`` imports it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image

CANVAS = 1024
MARGIN = 32
MAX_SHIFT = 256


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_and_resize(photo: Image.Image, mask: Image.Image, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Crop a full photo to its mask bbox and rescale it to a random fraction of the half-canvas fit."""
    box = _bbox(np.array(mask) > 128)
    photo_crop, mask_crop = photo.crop(box), mask.crop(box)
    width, height = photo_crop.size
    largest = min((CANVAS // 2 - MARGIN) / width, (CANVAS - MARGIN) / height)
    factor = rng.uniform(0.75 * largest, largest)
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    pixels = np.array(photo_crop.resize(size))
    subject = np.array(mask_crop.resize(size)) > 128
    pixels[~subject] = 0
    return pixels, subject


def naive_seg_mix(
    photos: Sequence[Image.Image], masks: Sequence[Image.Image], rng: random.Random
) -> tuple[Image.Image, np.ndarray]:
    """One composite of two (photo, mask) pairs: (RGB image, union mask)."""
    first, second = (crop_and_resize(p, m, rng) for p, m in zip(photos, masks, strict=True))
    if rng.random() < 0.5:
        first, second = second, first
    out = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    coverage = np.zeros((CANVAS, CANVAS))
    (left_px, left_mask), (right_px, right_mask) = first, second
    left_y = rng.randint(0, CANVAS - left_mask.shape[0])
    right_y = rng.randint(0, CANVAS - right_mask.shape[0])
    left_x = rng.randint(1, MAX_SHIFT)
    right_end = CANVAS - rng.randint(1, MAX_SHIFT)
    right_x = right_end - right_mask.shape[1]
    left_region = (slice(left_y, left_y + left_mask.shape[0]), slice(left_x, left_x + left_mask.shape[1]))
    right_region = (slice(right_y, right_y + right_mask.shape[0]), slice(right_x, right_end))
    coverage[left_region] += left_mask
    coverage[right_region] += right_mask
    out[left_region] = left_px
    out[coverage > 1.5] = 0  # the overlap goes to the subject pasted second
    out[right_region] += right_px
    union = coverage > 0
    out[~union] = 255
    return Image.fromarray(out), union
