"""Seg-Mix: MuDI's data augmentation (Algorithm 1) that pastes segmented subjects on a flat background.

Each composite puts ``k`` cut-outs of different characters side by side (one canvas column each, jittered
inwards so they may overlap), pairs it with "A photo of [V1] and [V2], simple white background." and
records each subject's *visible* mask. Compared with MuDI's code (docs/design.md#composition):

- the canvas is any size and every MuDI constant is a fraction of it (1024-px margin 32 -> 1/32,
  x-offset up to 256 -> 1/(2k) of the width), so 512- and 1024-px models get the same layouts;
- ``k >= 2`` subjects, not exactly two;
- an overlap budget (``max_occlusion``), a minimum visible size and a maximum upscale, enforced by
  resampling the layout, so no subject is hidden behind another or blown up from a thumbnail;
- the background colour is white, black or any flat colour, and the prompt says which;
- inputs are pre-cut RGBA cut-outs, resized once per composite, so no full-resolution photo is touched;
- everything random comes from one local ``numpy.random.Generator(seed)``: same seed, same bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.settings import internal
from pipeline.storage.hashing import sha256_json

# MuDI's constants at its 1024-px canvas, kept as fractions so other resolutions scale with them.
_MUDI_CANVAS = 1024
_MARGIN_FRACTION = 32 / _MUDI_CANVAS
"""Fit box of one subject = column minus this margin (MuDI: (512 - 32) x (1024 - 32))."""
_SHIFT_FRACTION_K2 = 256 / _MUDI_CANVAS
"""Largest inward x-offset for k = 2 (MuDI: randint(1, 256)); with k columns: this * 2 / k of the width."""
_ALPHA_THRESHOLD = 128
"""Alpha >= this is subject, below is background; the same cut as MuDI's mask files (>128, see images.py)."""
_BINARY_LUT = [0] * _ALPHA_THRESHOLD + [255] * (256 - _ALPHA_THRESHOLD)
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,  # PIL's default for RGB(A), i.e. what MuDI's ``image.resize`` uses
    "bilinear": Image.Resampling.BILINEAR,  # ~1.6x faster; PIL still antialiases it when downscaling
    "lanczos": Image.Resampling.LANCZOS,
}

_CV2_UPSCALE = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}

_NAMED_BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "white": ((255, 255, 255), "simple white"),
    "black": ((0, 0, 0), "simple black"),
}
_FLAT_BACKGROUND_WORD = "simple solid-colour"
"""Prompt word for an arbitrary (r, g, b) background: colour names would be guesses, "solid colour" is not."""


class SegMixError(CastloraError, ValueError):
    """Seg-Mix inputs or settings are invalid, or no layout satisfies the constraints."""


def _fit_box(config: SegMixConfig) -> tuple[float, float]:
    """Largest subject size that fits one column with MuDI's margin."""
    width, height = config.canvas
    return width / config.k - _MARGIN_FRACTION * width, height - _MARGIN_FRACTION * height


@dataclass(frozen=True)
class SegMixSubject:
    image: Image.Image
    """RGBA cut-out (alpha = mask), cropped to the subject (transparent borders are trimmed anyway)."""
    phrase: str
    """What the prompt calls it: the token phrase ("olis dog"), or the class noun for prior images."""
    character_id: str = ""
    sha256: str = ""
    """Content hash of the cut-out file, carried into lineage."""


@dataclass(frozen=True)
class SegMixConfig:
    canvas: tuple[int, int] = internal((1024, 1024))
    """(width, height) of the composite (the launchpad sets it from the bank's canvas_width/canvas_height)."""
    k: int = 2
    """Subjects per composite; the canvas width is split into k columns, one subject each."""
    scale_range: tuple[float, float] = (0.75, 1.0)
    """Scale drawn uniformly in this range times the largest scale that fits the column (MuDI: 0.75..1)."""
    relative_scale: dict[str, float] | None = None
    """phrase or character_id -> relative height (dog 2.0, toy 1.0): one shared draw keeps the ratio."""
    max_occlusion: float = 0.3
    """Largest fraction of any subject's pixels that another subject may hide; layouts over it are redrawn."""
    min_subject_fraction: float = 0.02
    """Each subject's visible pixels must cover at least this fraction of the canvas."""
    max_upscale: float = 2.0
    """A cut-out is never enlarged more than this (MuDI upscales thumbnails without limit)."""
    background: str | tuple[int, int, int] = "white"
    """"white", "black" or an (r, g, b) flat colour (in the launchpad: ``r,g,b``, e.g. ``128,128,128``)."""
    prompt_template: str = "A photo of {subjects}, {background} background."
    """``{subjects}``: phrases joined "A and B" / "A, B and C"; ``{background}``: see ``background_word``."""
    shuffle_prompt_order: bool = True
    """Phrase order random and independent of left/right placement, as in MuDI."""
    max_tries: int = 50
    """Layouts drawn before giving up with SegMixError."""
    resample: str = "bicubic"
    """Filter for resizing cut-outs: "bicubic" (MuDI's), "bilinear" (softer) or "lanczos" (PIL, slowest)."""

    def __post_init__(self) -> None:
        width, height = self.canvas
        if width < 16 or height < 16:
            raise SegMixError(f"SegMixConfig.canvas must be at least 16x16 pixels, got {self.canvas}")
        if not 2 <= self.k <= 254:
            raise SegMixError(f"SegMixConfig.k must be between 2 and 254 subjects per composite, got {self.k}")
        low, high = self.scale_range
        if not 0 < low <= high <= 1:
            raise SegMixError(
                f"SegMixConfig.scale_range must satisfy 0 < low <= high <= 1 (fractions of the largest "
                f"fitting scale), got {self.scale_range}"
            )
        if self.relative_scale is not None:
            bad = {key: value for key, value in self.relative_scale.items() if not value > 0}
            if bad:
                raise SegMixError(f"SegMixConfig.relative_scale values must be > 0, got {bad}")
        if not 0 <= self.max_occlusion <= 1:
            raise SegMixError(f"SegMixConfig.max_occlusion must be in [0, 1], got {self.max_occlusion}")
        if not 0 <= self.min_subject_fraction < 1:
            raise SegMixError(f"SegMixConfig.min_subject_fraction must be in [0, 1), got {self.min_subject_fraction}")
        if not self.max_upscale > 0:
            raise SegMixError(f"SegMixConfig.max_upscale must be > 0, got {self.max_upscale}")
        if self.max_tries < 1:
            raise SegMixError(f"SegMixConfig.max_tries must be >= 1, got {self.max_tries}")
        if self.resample not in _RESAMPLE:
            raise SegMixError(f"SegMixConfig.resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if "{subjects}" not in self.prompt_template:
            raise SegMixError(f"SegMixConfig.prompt_template must contain '{{subjects}}', got {self.prompt_template!r}")
        if _fit_box(self)[0] < 1:
            raise SegMixError(
                f"SegMixConfig: {self.k} columns do not fit a {width}-px wide canvas (each column loses a "
                f"{_MARGIN_FRACTION:.4f} * width margin); lower k or widen the canvas"
            )
        self.background_rgb  # noqa: B018 - validates the background early

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        if isinstance(self.background, str):
            named = _NAMED_BACKGROUNDS.get(self.background)
            if named is None:
                raise SegMixError(
                    f"SegMixConfig.background must be 'white', 'black' or an (r, g, b) tuple, got {self.background!r}"
                )
            return named[0]
        rgb = tuple(self.background)
        if len(rgb) != 3 or not all(isinstance(c, int | np.integer) and 0 <= c <= 255 for c in rgb):
            raise SegMixError(
                f"SegMixConfig.background as a colour must be three ints in 0..255, got {self.background!r}"
            )
        return (int(rgb[0]), int(rgb[1]), int(rgb[2]))

    @property
    def background_word(self) -> str:
        """The prompt's background words: "simple white", "simple black" or "simple solid-colour"."""
        rgb = self.background_rgb
        for named_rgb, word in _NAMED_BACKGROUNDS.values():
            if rgb == named_rgb:
                return word
        return _FLAT_BACKGROUND_WORD


DEFAULT_CONFIG = SegMixConfig()


def config_hash(config: SegMixConfig) -> str:
    """Stable hash of every setting, for caches and lineage."""
    return sha256_json(dataclasses.asdict(config))


@dataclass
class Composite:
    image: Image.Image
    """RGB, canvas size; pixels outside ``union_mask`` are exactly the background colour."""
    masks: list[np.ndarray]
    """Per subject (input order): bool HxW of its *visible* pixels; disjoint, their OR is ``union_mask``."""
    boxes: list[tuple[int, int, int, int]]
    """Per subject: (x0, y0, x1, y1), x1/y1 exclusive, of the whole pasted subject including hidden parts."""
    prompt: str
    union_mask: np.ndarray
    occlusion: list[float]
    """Per subject: fraction of its pasted pixels hidden by subjects pasted later."""
    seed: int
    order: list[int]
    """Paste order (subject indices); a later subject wins overlaps."""
    scales: list[float]
    """Per subject: resize factor applied to the (trimmed) cut-out."""
    attempts: int
    """Layouts drawn until one met the constraints (1 = first try)."""
    phrases: list[str] = field(default_factory=list)
    """Per subject (input order), as used in the prompt."""


@dataclass(frozen=True)
class PreparedSubject:
    """A validated cut-out, trimmed to its opaque bbox and ready to resize; reuse it across composites.

    ``working`` is premultiplied ("RGBa") so resizing never pulls the junk colour of transparent pixels
    into edge pixels. When the cut-out is larger than any size the config can paste it at, ``working`` is
    downscaled once to that largest size, so each composite resizes a small image instead of the full crop;
    scales and boxes are still computed from the original ``size``, so layouts do not depend on it.
    """

    subject: SegMixSubject
    working: Image.Image
    size: tuple[int, int]
    """(width, height) of the trimmed cut-out; ``Composite.scales`` are relative to this."""
    area: int
    """Opaque pixels of the trimmed cut-out at ``size``."""
    fit_key: tuple[object, ...]
    """The config settings ``working`` was sized for; another config re-prepares from ``subject``."""

    @property
    def phrase(self) -> str:
        return self.subject.phrase


@dataclass(frozen=True)
class _Placed:
    x: int
    y: int
    rgba: Image.Image
    """Unpremultiplied RGBA at the pasted size."""
    paste_mask: Image.Image
    """Mode "1" binarised alpha: PIL pastes exactly these pixels, nothing blends."""
    mask: np.ndarray


def _fit_key(config: SegMixConfig) -> tuple[object, ...]:
    return (config.canvas, config.k, config.scale_range[1], config.resample)


def _subject_name(subject: SegMixSubject, index: int) -> str:
    suffix = f", character {subject.character_id!r}" if subject.character_id else ""
    return f"Seg-Mix subject {index + 1} ({subject.phrase!r}{suffix})"


def _as_subject(item: SegMixSubject | Image.Image, index: int) -> SegMixSubject:
    if isinstance(item, SegMixSubject):
        return item
    if isinstance(item, Image.Image):
        return SegMixSubject(image=item, phrase=f"[V{index + 1}]")
    raise SegMixError(
        f"Seg-Mix subject {index + 1} is a {type(item).__name__}; pass SegMixSubject or an RGBA PIL image"
    )


def prepare_subject(
    item: SegMixSubject | Image.Image | PreparedSubject, config: SegMixConfig, index: int = 0
) -> PreparedSubject:
    """Validate and trim one cut-out for ``config`` (``index`` only names it in errors and "[V{i+1}]")."""
    if isinstance(item, PreparedSubject):
        if item.fit_key == _fit_key(config):
            return item
        item = item.subject
    subject = _as_subject(item, index)
    image = subject.image
    name = _subject_name(subject, index)
    if image.mode != "RGBA":
        raise SegMixError(
            f"{name} is a {image.mode} image; Seg-Mix needs RGBA cut-outs whose alpha is the subject mask "
            "(make them with pipeline.segment.masks.cutout_rgba)"
        )
    opaque = np.asarray(image.getchannel("A")) >= _ALPHA_THRESHOLD
    rows = np.flatnonzero(opaque.any(axis=1))
    if rows.size == 0:
        raise SegMixError(
            f"{name} has no opaque pixels (alpha >= {_ALPHA_THRESHOLD}): its mask is empty; re-segment the "
            "photo or supply its mask by hand"
        )
    cols = np.flatnonzero(opaque.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    trimmed = image.crop(box) if box != (0, 0, image.width, image.height) else image
    width, height = trimmed.size
    working = trimmed.convert("RGBa")
    fit_w, fit_h = _fit_box(config)
    largest = config.scale_range[1] * min(fit_w / width, fit_h / height)
    if largest < 1:
        working = working.resize(
            (max(1, math.ceil(width * largest)), max(1, math.ceil(height * largest))),
            _RESAMPLE[config.resample],
        )
    return PreparedSubject(subject, working, (width, height), int(np.count_nonzero(opaque)), _fit_key(config))


def prepare_subjects(
    subjects: Sequence[SegMixSubject | Image.Image | PreparedSubject], config: SegMixConfig
) -> list[PreparedSubject]:
    return [prepare_subject(item, config, index) for index, item in enumerate(subjects)]


def join_phrases(phrases: Sequence[str]) -> str:
    """Phrases joined as "A", "A and B" or "A, B and C"."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def build_prompt(phrases: Sequence[str], config: SegMixConfig) -> str:
    return config.prompt_template.format(subjects=join_phrases(phrases), background=config.background_word)


def _relative_sizes(prepared: Sequence[PreparedSubject], config: SegMixConfig) -> list[float]:
    assert config.relative_scale is not None
    sizes = []
    for item in prepared:
        phrase, character_id = item.subject.phrase, item.subject.character_id
        value = config.relative_scale.get(phrase, config.relative_scale.get(character_id))
        if value is None:
            raise SegMixError(
                f"SegMixConfig.relative_scale has no entry for {phrase!r} (character {character_id!r}); "
                f"it names {sorted(config.relative_scale)}. Give every subject a size, or set it to None"
            )
        sizes.append(float(value))
    return sizes


def _scales_for(prepared: Sequence[PreparedSubject], config: SegMixConfig, draws: Sequence[float]) -> list[float]:
    """Resize factors for uniform draws in [0, 1] mapped onto ``scale_range`` of the fitting scale.

    Independent mode uses one draw per subject; relative mode uses ``draws[0]`` for the shared size.
    """
    fit_w, fit_h = _fit_box(config)
    low, high = config.scale_range
    fractions = [low + (high - low) * d for d in draws]
    sizes = [item.size for item in prepared]
    if config.relative_scale is None:
        return [
            min(f * min(fit_w / w, fit_h / h), config.max_upscale) for f, (w, h) in zip(fractions, sizes, strict=True)
        ]
    # One shared height t for relative size 1: subject i is t * r_i tall, so the height ratios hold. t is
    # capped so every subject fits its column and none is upscaled past max_upscale.
    relative = _relative_sizes(prepared, config)
    t_fit = min(min(fit_w * h / (r * w), fit_h / r) for r, (w, h) in zip(relative, sizes, strict=True))
    t_cap = min(config.max_upscale * h / r for r, (_, h) in zip(relative, sizes, strict=True))
    shared = min(fractions[0] * t_fit, t_cap)
    return [shared * r / h for r, (_, h) in zip(relative, sizes, strict=True)]


def _check_reachable(prepared: Sequence[PreparedSubject], config: SegMixConfig) -> None:
    """Fail fast, not after max_tries, when even the largest allowed scale misses min_subject_fraction."""
    width, height = config.canvas
    needed = config.min_subject_fraction * width * height
    for item, scale in zip(prepared, _scales_for(prepared, config, [1.0] * len(prepared)), strict=True):
        if item.area * scale * scale < 0.9 * needed:
            raise SegMixError(
                f"Seg-Mix subject {item.phrase!r} ({item.size[0]}x{item.size[1]} px cut-out) cannot cover "
                f"min_subject_fraction={config.min_subject_fraction} of the {width}x{height} canvas even at "
                f"its largest allowed scale {scale:.2f} (max_upscale={config.max_upscale}). Use a larger "
                "cut-out, or lower min_subject_fraction"
            )


def _x_position(rng: np.random.Generator, column: int, width: int, config: SegMixConfig) -> int:
    """MuDI's placement per column: edge columns hug their outer edge, shifted inwards by randint(1, max)."""
    canvas_w = config.canvas[0]
    k = config.k
    start, end = column * canvas_w / k, (column + 1) * canvas_w / k
    max_shift = max(1, round(_SHIFT_FRACTION_K2 * canvas_w * 2 / k))
    shift = int(rng.integers(1, max_shift + 1))
    middle = (k - 1) / 2
    if column < middle:
        x = start + shift
    elif column > middle:
        x = end - shift - width
    else:  # the centre column of an odd k: centred, jittered either way
        x = (start + end - width) / 2 + int(rng.integers(-max_shift, max_shift + 1))
    return int(min(max(round(x), 0), canvas_w - width))


def _resize_premultiplied(working: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    """Resize an "RGBa" image. Bicubic/bilinear go through OpenCV's SIMD resize (about 6x faster than PIL's
    here, the largest per-composite cost): its cubic kernel enlarges, INTER_AREA antialiases when shrinking
    (PIL antialiases its filters too). Lanczos stays on PIL."""
    if resample == "lanczos":
        return working.resize(size, _RESAMPLE[resample])
    shrinking = size[0] * size[1] < working.width * working.height
    interpolation = cv2.INTER_AREA if shrinking else _CV2_UPSCALE[resample]
    resized = np.ascontiguousarray(cv2.resize(np.asarray(working), size, interpolation=interpolation))
    return Image.frombuffer("RGBa", size, resized, "raw", "RGBa", 0, 1)


def _resized(item: PreparedSubject, scale: float, config: SegMixConfig) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """(RGBA, mode-"1" paste mask, bool mask) of the cut-out at ``scale`` of its original size."""
    width, height = item.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    working = item.working
    rgba = (_resize_premultiplied(working, size, config.resample) if size != working.size else working).convert("RGBA")
    # Binary alpha, not blending: a soft edge would mix subject colour into pixels the masks call
    # background, so the background would not be exactly the stated colour, the visible masks would
    # disagree with the pixels, and the hard subject/background border is what Seg-Mix trains on.
    alpha = rgba.getchannel("A")
    return rgba, alpha.point(_BINARY_LUT, "1"), np.asarray(alpha) >= _ALPHA_THRESHOLD


def _draw_layout(
    rng: np.random.Generator, prepared: Sequence[PreparedSubject], config: SegMixConfig
) -> tuple[list[_Placed], list[int], list[float]]:
    k = len(prepared)
    columns = rng.permutation(k)
    order = [int(i) for i in rng.permutation(k)]
    draws = list(rng.random(1 if config.relative_scale is not None else k))
    scales = _scales_for(prepared, config, draws * (k if config.relative_scale is not None else 1))
    canvas_h = config.canvas[1]
    placed = []
    for index, item in enumerate(prepared):
        rgba, paste_mask, mask = _resized(item, scales[index], config)
        x = _x_position(rng, int(columns[index]), rgba.width, config)
        y = int(rng.integers(0, max(canvas_h - rgba.height, 0) + 1))
        placed.append(_Placed(x, y, rgba, paste_mask, mask))
    return placed, order, scales


def _owner_map(placed: Sequence[_Placed], order: Sequence[int], canvas: tuple[int, int]) -> np.ndarray:
    """uint8 HxW: 0 = background, i + 1 = subject i is visible there (later pastes overwrite earlier)."""
    owner = Image.new("L", canvas, 0)
    for index in order:
        p = placed[index]
        owner.paste(index + 1, (p.x, p.y, p.x + p.rgba.width, p.y + p.rgba.height), p.paste_mask)
    return np.asarray(owner)


def _occlusion(placed: Sequence[_Placed], owner: np.ndarray) -> tuple[list[float], list[int]]:
    """Per subject: hidden fraction of its pasted pixels and its visible pixel count."""
    hidden, visible = [], []
    for index, p in enumerate(placed):
        total = int(np.count_nonzero(p.mask))
        region = owner[p.y : p.y + p.rgba.height, p.x : p.x + p.rgba.width]
        seen = int(np.count_nonzero(region == index + 1))
        visible.append(seen)
        hidden.append(1.0 - seen / total if total else 1.0)
    return hidden, visible


def _violation(
    prepared: Sequence[PreparedSubject], hidden: Sequence[float], visible: Sequence[int], config: SegMixConfig
) -> str | None:
    area = config.canvas[0] * config.canvas[1]
    for item, fraction, seen in zip(prepared, hidden, visible, strict=True):
        if seen == 0:
            return f"{item.phrase!r} is not visible at all"
        if fraction > config.max_occlusion:
            return f"{item.phrase!r} {fraction:.0%} hidden > max_occlusion={config.max_occlusion}"
        if seen / area < config.min_subject_fraction:
            return (
                f"{item.phrase!r} covers {seen / area:.4f} of the canvas "
                f"< min_subject_fraction={config.min_subject_fraction}"
            )
    return None


def _render(placed: Sequence[_Placed], order: Sequence[int], config: SegMixConfig) -> Image.Image:
    canvas = Image.new("RGB", config.canvas, config.background_rgb)
    for index in order:
        p = placed[index]
        canvas.paste(p.rgba, (p.x, p.y), p.paste_mask)
    return canvas


def _full_box(p: _Placed) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(p.mask.any(axis=1))
    cols = np.flatnonzero(p.mask.any(axis=0))
    return (p.x + int(cols[0]), p.y + int(rows[0]), p.x + int(cols[-1]) + 1, p.y + int(rows[-1]) + 1)


def compose(
    subjects: Sequence[SegMixSubject | Image.Image | PreparedSubject],
    config: SegMixConfig = DEFAULT_CONFIG,
    seed: int = 0,
) -> Composite:
    """One Seg-Mix composite of ``subjects`` (masks, boxes... in input order), deterministic in ``seed``.

    Layouts whose occlusion or visible size break the config are redrawn, up to ``config.max_tries``.
    Pass ``prepare_subjects(...)`` results when composing the same cut-outs many times: the output is the
    same, only the per-cut-out work is not repeated.
    """
    if len(subjects) != config.k:
        raise SegMixError(
            f"Seg-Mix got {len(subjects)} subject(s) but SegMixConfig.k is {config.k}; pass exactly k "
            "cut-outs (or change k)"
        )
    prepared = prepare_subjects(subjects, config)
    _check_reachable(prepared, config)
    rng = np.random.default_rng(seed)
    phrases = [item.phrase for item in prepared]
    prompt_order = rng.permutation(len(phrases)) if config.shuffle_prompt_order else range(len(phrases))
    prompt = build_prompt([phrases[i] for i in prompt_order], config)

    reason = ""
    for attempt in range(1, config.max_tries + 1):
        placed, order, scales = _draw_layout(rng, prepared, config)
        owner = _owner_map(placed, order, config.canvas)
        hidden, visible = _occlusion(placed, owner)
        violation = _violation(prepared, hidden, visible, config)
        if violation is not None:
            reason = violation
            continue
        return Composite(
            image=_render(placed, order, config),
            masks=[owner == index + 1 for index in range(len(placed))],
            boxes=[_full_box(p) for p in placed],
            prompt=prompt,
            union_mask=owner > 0,
            occlusion=hidden,
            seed=seed,
            order=order,
            scales=[float(s) for s in scales],
            attempts=attempt,
            phrases=phrases,
        )
    raise SegMixError(
        f"Seg-Mix found no layout for {phrases} on a {config.canvas[0]}x{config.canvas[1]} canvas in "
        f"{config.max_tries} tries (last: {reason}). Raise max_occlusion or max_tries, lower "
        "min_subject_fraction, or use fewer subjects per composite (k)"
    )
