"""Reference photo intake: decode, orient, convert, size-check and de-duplicate.

Nothing here raises on a single bad file: each one becomes a ``RejectedPhoto`` with a reason, so one
corrupt upload never costs the user the rest of the set.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.hashing import sha256_bytes, sha256_file

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""File types castlora treats as images when scanning a folder (class images, user masks)."""


@dataclass(frozen=True)
class IntakeConfig:
    min_side: int = 256
    """Photos whose shorter side is below this are rejected as too small."""
    max_side: int = 1536
    """Larger photos are downscaled (aspect kept) so later stages never handle huge images."""
    min_photos: int = 3
    """A character with fewer usable photos than this fails the stage."""


@dataclass
class AcceptedPhoto:
    source: str
    source_sha256: str
    image: Image.Image
    pixel_sha256: str
    """Hash of the normalised RGB pixels and size: equal for re-encodes of the same picture."""
    original_size: tuple[int, int]


@dataclass(frozen=True)
class RejectedPhoto:
    source: str
    reason: str


@dataclass
class IntakeResult:
    accepted: list[AcceptedPhoto] = field(default_factory=list)
    rejected: list[RejectedPhoto] = field(default_factory=list)


def pixel_hash(image: Image.Image) -> str:
    header = f"{image.mode}:{image.width}x{image.height}:".encode()
    return sha256_bytes(header + image.tobytes())


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB copy; transparent areas become ``background`` rather than black garbage."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def decode_photo(data: bytes, config: IntakeConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes into (normalised RGB image, original size) or raise ValueError with a human reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                original_size = opened.size
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                image = to_rgb(image.copy())
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"corrupt or truncated image: {exc}") from exc
    if min(image.size) < config.min_side:
        raise ValueError(f"too small: {image.width}x{image.height}, shorter side must be at least {config.min_side}px")
    if max(image.size) > config.max_side:
        image.thumbnail((config.max_side, config.max_side), Image.Resampling.LANCZOS)
    return image, original_size


def intake_photos(sources: Iterable[str | Path], config: IntakeConfig) -> IntakeResult:
    """Validate and normalise photos; duplicates (same pixels) keep the first occurrence."""
    result = IntakeResult()
    seen: dict[str, str] = {}
    for source in sources:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.rejected.append(RejectedPhoto(str(path), f"cannot read file: {exc.strerror or exc}"))
            continue
        try:
            image, original_size = decode_photo(data, config)
        except ValueError as exc:
            result.rejected.append(RejectedPhoto(str(path), str(exc)))
            continue
        digest = pixel_hash(image)
        if digest in seen:
            result.rejected.append(RejectedPhoto(str(path), f"duplicate of {seen[digest]}"))
            continue
        seen[digest] = str(path)
        result.accepted.append(
            AcceptedPhoto(
                source=str(path),
                source_sha256=sha256_bytes(data),
                image=image,
                pixel_sha256=digest,
                original_size=original_size,
            )
        )
    return result


def save_png(image: Image.Image, path: Path) -> str:
    """Write ``image`` as PNG (atomically) and return the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return sha256_file(path)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Grayscale mask file -> bool array (>128 is subject, MuDI's convention), resized to ``size`` if given."""
    with Image.open(path) as opened:
        gray = opened.convert("L")
        if size is not None and gray.size != size:
            gray = gray.resize(size, Image.Resampling.NEAREST)
        return np.asarray(gray) > 128


def mask_to_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def image_grid(images: Sequence[Image.Image], columns: int = 4, cell: int = 192) -> Image.Image:
    """Thumbnails on a white sheet, for asset metadata previews."""
    columns = max(1, min(columns, len(images) or 1))
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for index, image in enumerate(images):
        thumb = to_rgb(image).copy()
        thumb.thumbnail((cell, cell))
        x = (index % columns) * cell + (cell - thumb.width) // 2
        y = (index // columns) * cell + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    return sheet
