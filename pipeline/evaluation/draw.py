"""Detect-and-Compare boxes drawn on images, and captioned contact sheets of them for the evaluation report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from pipeline.images import to_rgb

Box = Sequence[float]
"""(x0, y0, x1, y1) in pixels of the image it is drawn on."""
Colour = tuple[int, int, int]

UNASSIGNED_COLOUR: Colour = (150, 150, 150)
SUBJECT_COLOURS: tuple[Colour, ...] = (
    (230, 25, 75),  # red
    (0, 130, 200),  # blue
    (60, 180, 75),  # green
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (0, 170, 170),  # teal
    (240, 50, 230),  # magenta
    (170, 110, 40),  # brown
)
"""One colour per subject, in subject order; chosen to stay apart from each other and from the grey."""


def subject_colour(index: int) -> Colour:
    return SUBJECT_COLOURS[index % len(SUBJECT_COLOURS)]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def box_annotations(
    n_boxes: int,
    assignment: Sequence[int | None] | None,
    subjects: Sequence[str],
    detector_labels: Sequence[str] | None = None,
) -> tuple[list[str], list[Colour]]:
    """Per-box labels and colours from a D&C record: the box assigned to subject j gets subject j's name and
    colour; every other box (all of them on a count mismatch, ``assignment=None``) is grey with its detector
    label."""
    fallback = list(detector_labels) if detector_labels is not None else ["unassigned"] * n_boxes
    labels = [fallback[i] if i < len(fallback) else "unassigned" for i in range(n_boxes)]
    colours = [UNASSIGNED_COLOUR] * n_boxes
    for subject_index, box_index in enumerate(assignment or ()):
        if box_index is None or not 0 <= box_index < n_boxes or subject_index >= len(subjects):
            continue
        labels[box_index] = subjects[subject_index]
        colours[box_index] = subject_colour(subject_index)
    return labels, colours


def _colours_by_label(labels: Sequence[str | None]) -> list[Colour]:
    """A colour per distinct label in first-appearance order; empty labels are unassigned (grey)."""
    order: dict[str, int] = {}
    colours = []
    for label in labels:
        if not label or label == "unassigned":
            colours.append(UNASSIGNED_COLOUR)
            continue
        colours.append(subject_colour(order.setdefault(label, len(order))))
    return colours


def _clip(value: float, limit: int) -> int:
    return round(min(max(value, 0.0), limit - 1))


def _clamped_box(box: Box, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Sorted, rounded and clipped to the image; None for non-finite coordinates."""
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        return None
    x0, x1 = sorted((float(box[0]), float(box[2])))
    y0, y1 = sorted((float(box[1]), float(box[3])))
    return _clip(x0, width), _clip(y0, height), _clip(x1, width), _clip(y1, height)


def _text_size(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _label_origin(
    box: tuple[int, int, int, int], size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[int, int]:
    """Top-left of the label tag: above the box when it fits, else just inside its top edge; always on the image."""
    (x0, y0, _, _), (w, h), (width, height) = box, size, image_size
    y = y0 - h if y0 - h >= 0 else y0
    x = min(max(x0, 0), max(width - w, 0))
    y = min(max(y, 0), max(height - h, 0))
    return x, y


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Box],
    labels: Sequence[str | None],
    colours: Sequence[Colour | None] | None = None,
    width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """An RGB copy of ``image`` with each box outlined and labelled (the input is left untouched).

    ``colours[i]`` None (or ``colours`` None and an empty/"unassigned" label) draws box i in grey. ``width``
    and ``font_size`` default to a size that stays readable relative to the image.
    """
    canvas = to_rgb(image).copy()
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    width = width if width is not None else max(2, round(short_side / 160))
    font = _font(font_size if font_size is not None else max(10, short_side // 28))
    labels = list(labels) + [None] * (len(boxes) - len(labels))
    chosen = list(colours) if colours is not None else _colours_by_label(labels)
    chosen += [None] * (len(boxes) - len(chosen))
    for box, label, colour in zip(boxes, labels, chosen, strict=False):
        clamped = _clamped_box(box, *canvas.size)
        if clamped is None:
            continue
        colour = colour or UNASSIGNED_COLOUR
        draw.rectangle(clamped, outline=colour, width=width)
        if label:
            text_w, text_h = _text_size(draw, str(label), font)
            pad = 2
            tag_size = (text_w + 2 * pad, text_h + 2 * pad)
            x, y = _label_origin(clamped, tag_size, canvas.size)
            draw.rectangle((x, y, x + tag_size[0] - 1, y + tag_size[1] - 1), fill=colour)
            text_left, text_top, _, _ = draw.textbbox((0, 0), str(label), font=font)
            draw.text((x + pad - text_left, y + pad - text_top), str(label), fill=(255, 255, 255), font=font)
    return canvas


AnnotatedItem = (
    tuple[Image.Image, Sequence[Box], Sequence[str | None], str]
    | tuple[Image.Image, Sequence[Box], Sequence[str | None], str, Sequence[Colour | None]]
)
"""(image, boxes, box labels, caption), optionally followed by the box colours (else coloured by label)."""


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
) -> list[str]:
    """Greedy word wrap to ``width`` pixels; explicit newlines are kept."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}".strip()
            if current and _text_size(draw, candidate, font)[0] > width:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return lines


def annotated_grid(
    items: Sequence[AnnotatedItem],
    columns: int = 4,
    cell_size: int = 256,
    caption_font_size: int = 12,
    max_caption_lines: int = 3,
    gutter: int = 6,
) -> Image.Image:
    """A contact sheet: each image fitted into a ``cell_size`` square with its boxes drawn at that scale (so
    labels stay legible), and its caption (e.g. "segmix · seed 3 · D&C 0.41") underneath; ``gutter`` white pixels
    between cells keep neighbouring images apart."""
    font = _font(caption_font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = _text_size(measure, "Ag", font)[1] + 3
    if not items:
        sheet = Image.new("RGB", (cell_size, cell_size // 4), (255, 255, 255))
        ImageDraw.Draw(sheet).text((4, 4), "no images", fill=(0, 0, 0), font=font)
        return sheet
    captions = [_wrap(measure, str(item[3]), font, cell_size - 8)[:max_caption_lines] for item in items]
    caption_height = max(len(lines) for lines in captions) * line_height + 6
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    step_x, step_y = cell_size + gutter, cell_size + caption_height + gutter
    sheet = Image.new("RGB", (columns * step_x - gutter, rows * step_y - gutter), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (item, caption_lines) in enumerate(zip(items, captions, strict=True)):
        image, boxes, labels = item[0], item[1], item[2]
        colours = item[4] if len(item) > 4 else None
        thumb = to_rgb(image).copy()
        thumb.thumbnail((cell_size, cell_size))
        scale_x, scale_y = thumb.width / image.width, thumb.height / image.height
        scaled = [(b[0] * scale_x, b[1] * scale_y, b[2] * scale_x, b[3] * scale_y) for b in boxes]
        thumb = draw_boxes(thumb, scaled, labels, colours, width=2, font_size=max(9, cell_size // 20))
        left = (index % columns) * step_x
        top = (index // columns) * step_y
        sheet.paste(thumb, (left + (cell_size - thumb.width) // 2, top + (cell_size - thumb.height) // 2))
        for line_index, line in enumerate(caption_lines):
            draw.text((left + 4, top + cell_size + 3 + line_index * line_height), line, fill=(0, 0, 0), font=font)
    return sheet
