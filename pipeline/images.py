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

from pipeline.storage.atomic import atomic_path
from pipeline.storage.hashing import sha256_bytes, sha256_file

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""File types castlora treats as images when scanning a folder (class images, user masks)."""


@dataclass(frozen=True)
class IntakeConfig:
    min_side: int = 256
    """Photos whose shorter side is below this after downscaling to ``max_side`` are rejected as too small."""
    max_side: int = 1536
    """Larger photos are downscaled (aspect kept) so later stages never handle huge images."""
    max_aspect_ratio: float = 4.0
    """Longer side / shorter side above this is refused: training crops to a square, which would keep only a
    sliver of a panorama or a tall strip, and downscaling one would leave its short side too small."""
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


_SIXTEEN_BIT_MAX = 65535


def to_8bit(image: Image.Image) -> Image.Image:
    """8-bit greyscale ("L") copy of a 16-bit, 32-bit integer or float greyscale image, scaled from its nominal
    range; any other mode is returned as it is.

    Pillow's own ``convert`` clips instead of scaling (a 16-bit photo turns white, a 0..1 float one black), so
    the scaling is done here: 16-bit and 32-bit integer pixels as 0..65535 (Pillow reads 16-bit PNGs as either
    mode), float pixels as 0..1. Values outside those ranges have no faithful 8-bit reading and raise
    ``ValueError`` naming the mode and the range found.
    """
    mode = image.mode
    if not (mode.startswith("I") or mode == "F"):
        return image
    pixels = np.asarray(image)
    if pixels.size == 0:
        raise ValueError(f"empty image in mode {mode}")
    if mode == "F":
        if not np.isfinite(pixels).all():
            raise ValueError("float image (mode F) holds NaN or infinite pixels; export it as 8- or 16-bit")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float image (mode F) with pixels from {low:g} to {high:g}; castlora reads float photos as 0..1, "
                "so export it as 8- or 16-bit"
            )
        scaled = pixels.astype(np.float64) * 255.0
    else:
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > _SIXTEEN_BIT_MAX:
            raise ValueError(
                f"integer image (mode {mode}) with pixels from {low} to {high}, beyond the 16-bit range "
                f"0..{_SIXTEEN_BIT_MAX}; export it as 8- or 16-bit"
            )
        scaled = pixels.astype(np.float64) * (255.0 / _SIXTEEN_BIT_MAX)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB copy, scaled faithfully from any mode Pillow decodes (see ``to_8bit``); transparent areas become
    ``background`` rather than black garbage. A mode with no faithful conversion raises ``ValueError`` naming it."""
    if image.mode == "RGB":
        return image
    image = to_8bit(image)
    if image.mode == "La":  # premultiplied; Pillow converts it to RGBA only through LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        converted = _colour_managed_srgb(image)
        if converted is not None:
            return converted
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported colour mode {image.mode}; export the photo as 8-bit RGB") from exc


def _colour_managed_srgb(image: Image.Image) -> Image.Image | None:
    """``image`` converted to sRGB through its embedded ICC profile, or None when the profile is unusable (CMYK
    then falls back to Pillow's uncalibrated formula)."""
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        transform = ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), image.mode, "RGB")
        return ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def decode_photo(data: bytes, config: IntakeConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes into (normalised RGB image, original size) or raise ValueError with a human reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                original_size = opened.size
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                image = image.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"corrupt or truncated image: {exc}") from exc
    image = to_rgb(image)  # its ValueError already names the mode
    width, height = image.size
    if min(width, height) < 1:
        raise ValueError(f"empty image ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > config.max_aspect_ratio:
        raise ValueError(
            f"aspect ratio {ratio:.1f}:1 ({width}x{height}) is beyond the limit of {config.max_aspect_ratio:g}:1; "
            "crop the photo around the subject"
        )
    if max(image.size) > config.max_side:
        image.thumbnail((config.max_side, config.max_side), Image.Resampling.LANCZOS)
    # Checked after downscaling: what later stages see is the resized photo.
    if min(image.size) < config.min_side:
        resized = (
            f" after downscaling {width}x{height} to max_side {config.max_side}"
            if image.size != (width, height)
            else ""
        )
        raise ValueError(
            f"too small: {image.width}x{image.height}{resized}, shorter side must be at least {config.min_side}px"
        )
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
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return sha256_file(path)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Grayscale mask file -> bool array (>128 is subject, MuDI's convention), resized to ``size`` if given."""
    with Image.open(path) as opened:
        gray = to_8bit(opened)  # a 16-bit mask would otherwise clip to all-subject
        gray = gray if gray.mode == "L" else gray.convert("L")
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
