"""Aspect-ratio buckets (docs/design.md#aspect-ratio-buckets): training sizes of about ``resolution``² pixels in
several aspect ratios, the bucket an image belongs to, and the cover-resize-then-crop that brings it there.

``square`` (the default) is the one bucket ``resolution`` x ``resolution``: every image is resized (shorter side)
and centre-cropped to it, exactly as castlora did before buckets. ``aspect`` (or an explicit list of ratios)
adds buckets with sides that are multiples of the family's ``size_multiple`` (latent downsampling x patch size:
8 for SDXL, 16 for FLUX's 2x2 packing), each image going to the bucket nearest its own aspect ratio.

Nothing here imports torch or the model: the Seg-Mix bank (a CPU stage) sizes its canvases with the same
functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.errors import CastloraError

SQUARE = "square"
ASPECT = "aspect"
DEFAULT_ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
"""The ratios ``aspect`` means (width:height): square, the usual photo formats and wide/tall video frames. Few
buckets on purpose: a pair has a handful of photos each, and every extra bucket splits them further."""
MAX_ASPECT = 4.0
"""Longest side / shortest side allowed in a list of ratios: beyond it a bucket is a sliver at training sizes."""
CANVAS_MULTIPLE = 16
"""Side multiple of Seg-Mix canvases rendered by aspect: every family's ``size_multiple`` divides it (SDXL 8,
FLUX 16), so a canvas is at most a few pixels off its training bucket."""


@dataclass(frozen=True, order=True)
class Bucket:
    """A training size in pixels."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def size(self) -> tuple[int, int]:
        """(height, width): the order SDXL's time ids and tensors use."""
        return self.height, self.width

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class CropGeometry:
    """How an image of some size is brought to a bucket: resized to cover it, then cropped."""

    resized: tuple[int, int]
    """(width, height) after resizing (both sides >= the bucket's)."""
    top: int
    left: int
    """The crop's top-left corner in the resized image (SDXL's ``crops_coords_top_left``)."""


def parse_aspects(setting: str, field: str = "buckets") -> tuple[tuple[int, int], ...] | None:
    """The ratios a bucket setting names: None for ``square``; ``DEFAULT_ASPECTS`` for ``aspect``; else a comma
    list of ``W:H`` ratios (``1:1,3:4,4:3``). A bad value is refused naming ``field``."""
    text = setting.strip().lower()
    if text == SQUARE:
        return None
    if text == ASPECT:
        return DEFAULT_ASPECTS
    ratios = []
    for part in text.split(","):
        pieces = part.strip().split(":")
        try:
            width, height = (int(p) for p in pieces)
        except ValueError:
            width = height = 0
        if len(pieces) != 2 or width < 1 or height < 1:
            raise CastloraError(
                f"{field}={setting!r}: use 'square', 'aspect' or a comma list of width:height ratios in whole "
                f"numbers (e.g. '1:1,3:4,4:3'); {part.strip()!r} is not one."
            )
        if max(width, height) / min(width, height) > MAX_ASPECT:
            raise CastloraError(f"{field}={setting!r}: ratio {width}:{height} is beyond {MAX_ASPECT:g}:1.")
        ratios.append((width, height))
    return tuple(dict.fromkeys(ratios))


def bucket_for_ratio(ratio: tuple[int, int], resolution: int, multiple: int) -> Bucket:
    """The ``ratio`` (width:height) bucket of about ``resolution``² pixels, sides rounded to ``multiple``."""
    aspect = ratio[0] / ratio[1]
    width = max(multiple, round(resolution * math.sqrt(aspect) / multiple) * multiple)
    height = max(multiple, round(resolution / math.sqrt(aspect) / multiple) * multiple)
    return Bucket(width, height)


def bucket_sizes(setting: str, resolution: int, multiple: int, field: str = "buckets") -> tuple[Bucket, ...]:
    """The buckets of a setting, sorted (width, height), without duplicates (small sizes can round two ratios to
    one bucket). ``square`` is ``resolution`` x ``resolution`` itself, whatever ``multiple`` is (today's size)."""
    aspects = parse_aspects(setting, field)
    if aspects is None:
        return (Bucket(resolution, resolution),)
    return tuple(sorted({bucket_for_ratio(ratio, resolution, multiple) for ratio in aspects}))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (in log ratio, so 2:1 and 1:2 are equally far from
    1:1); ties go to the first in ``buckets``' order."""
    if not buckets:
        raise CastloraError("No buckets to place an image in.")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - target))


def cover_crop(width: int, height: int, bucket: Bucket) -> CropGeometry:
    """Resize a ``width`` x ``height`` image to cover ``bucket`` (keeping its aspect), crop the centre. For a square
    bucket this is the shorter side to ``resolution`` and the centre square."""
    scale = max(bucket.width / width, bucket.height / height)
    new_w = max(bucket.width, round(width * scale))
    new_h = max(bucket.height, round(height * scale))
    return CropGeometry((new_w, new_h), (new_h - bucket.height) // 2, (new_w - bucket.width) // 2)


def fit_to_bucket(image: Image.Image, bucket: Bucket, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """``image`` resized to cover ``bucket`` and cropped to it (``cover_crop``)."""
    geometry = cover_crop(image.width, image.height, bucket)
    resized = image.resize(geometry.resized, resample)
    return resized.crop((geometry.left, geometry.top, geometry.left + bucket.width, geometry.top + bucket.height))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    with Image.open(path) as opened:
        return opened.size


def canvas_sizes(setting: str, width: int, height: int, field: str = "canvas_aspects") -> tuple[tuple[int, int], ...]:
    """(width, height) of the Seg-Mix canvases a bank setting asks for: ``square`` keeps the one
    ``width`` x ``height`` canvas; ratios give canvases of about the same pixel count, sides multiples of
    ``CANVAS_MULTIPLE``, in the setting's order."""
    aspects = parse_aspects(setting, field)
    if aspects is None:
        return ((width, height),)
    side = math.sqrt(width * height)
    sizes = (bucket_for_ratio(ratio, round(side), CANVAS_MULTIPLE) for ratio in aspects)
    return tuple(dict.fromkeys((b.width, b.height) for b in sizes))
