"""Boxes drawn on images and captioned grids of them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.draw import (
    UNASSIGNED_COLOUR,
    annotated_grid,
    box_annotations,
    draw_boxes,
    subject_colour,
)

BACKGROUND = (40, 90, 160)


def blank(size: tuple[int, int] = (200, 160), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, BACKGROUND if mode == "RGB" else 0)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_outline_changes_pixels_but_not_the_inside_or_the_input() -> None:
    image = blank()
    before = pixels(image).copy()
    drawn = draw_boxes(image, [(20, 30, 180, 150)], ["olis"], colours=[(255, 0, 0)], width=3)
    assert drawn is not image
    assert drawn.size == image.size and drawn.mode == "RGB"
    assert np.array_equal(pixels(image), before)  # input untouched
    out = pixels(drawn)
    assert tuple(out[90, 20]) == (255, 0, 0)  # left edge, mid-height
    assert tuple(out[90, 180]) == (255, 0, 0)  # right edge
    assert tuple(out[150, 100]) == (255, 0, 0)  # bottom edge
    assert tuple(out[90, 100]) == BACKGROUND  # far inside the box
    assert tuple(out[5, 195]) == BACKGROUND  # outside, away from the label
    assert (out != before).any(axis=2).sum() < 0.5 * out.shape[0] * out.shape[1]  # an outline, not a fill


def test_label_tag_is_drawn_near_the_box() -> None:
    drawn = pixels(draw_boxes(blank(), [(60, 60, 150, 150)], ["olis"], colours=[(255, 0, 0)], width=2))
    above = drawn[30:60, 60:150]
    assert ((above == (255, 0, 0)).all(axis=2)).sum() > 50  # the tag's fill sits just above the box
    assert (above[..., 1] > 150).any()  # with light text on it (the red tag has no green)


@pytest.mark.parametrize(
    "box",
    [
        (0, 0, 200, 160),  # the whole image
        (-30, -30, 40, 40),  # past the top-left corner
        (170, 140, 260, 220),  # past the bottom-right corner
        (150, 20, 30, 100),  # corners given in the wrong order
        (199, 159, 199, 159),  # a single pixel at the corner
        (math.nan, 0, 10, 10),  # not a number: skipped
    ],
)
def test_edge_boxes_do_not_crash_and_labels_stay_inside(box) -> None:
    image = blank()
    drawn = draw_boxes(image, [box], ["a rather long label"], colours=[(255, 0, 0)])
    assert drawn.size == image.size
    if math.isnan(box[0]):
        assert np.array_equal(pixels(drawn), pixels(image))
    else:
        assert ((pixels(drawn) == (255, 0, 0)).all(axis=2)).any()


def test_label_at_right_edge_is_shifted_into_the_image() -> None:
    """The tag for a box touching the right edge is moved left so its text is fully visible."""
    drawn = pixels(draw_boxes(blank(), [(190, 60, 199, 150)], ["mabel"], colours=[(255, 0, 0)], width=1))
    tag_columns = np.nonzero(((drawn[:60] == (255, 0, 0)).all(axis=2)).any(axis=0))[0]
    assert tag_columns.min() < 170  # started left of the box, not clipped at the border


def test_colours_default_per_label_and_grey_when_unassigned() -> None:
    image = blank((300, 100))
    boxes = [(10, 30, 90, 90), (110, 30, 190, 90), (210, 30, 290, 90)]
    drawn = pixels(draw_boxes(image, boxes, ["olis", "", "mabel"], width=2))
    assert tuple(drawn[60, 10]) == subject_colour(0)
    assert tuple(drawn[60, 110]) == UNASSIGNED_COLOUR
    assert tuple(drawn[60, 210]) == subject_colour(1)
    assert subject_colour(0) != subject_colour(1)


def test_box_annotations_from_assignment() -> None:
    labels, colours = box_annotations(3, [2, 0], ["olis", "mabel"], ["dog", "cat", "dog"])
    assert labels == ["mabel", "cat", "olis"]
    assert colours == [subject_colour(1), UNASSIGNED_COLOUR, subject_colour(0)]
    mismatch_labels, mismatch_colours = box_annotations(3, None, ["olis", "mabel"], ["dog", "cat", "dog"])
    assert mismatch_labels == ["dog", "cat", "dog"]
    assert mismatch_colours == [UNASSIGNED_COLOUR] * 3


def test_non_rgb_input_is_converted() -> None:
    drawn = draw_boxes(blank(mode="L"), [(10, 10, 50, 50)], ["x"], colours=[(0, 255, 0)])
    assert drawn.mode == "RGB"
    assert tuple(pixels(drawn)[30, 10]) == (0, 255, 0)


def test_annotated_grid_layout_boxes_and_captions() -> None:
    big = blank((400, 320))
    items = [
        (big, [(40, 60, 360, 300)], ["olis"], "segmix · seed 0 · D&C 0.41", [(255, 0, 0)]),
        (blank((160, 200)), [], [], "dreambooth · seed 1\nD&C 0.12"),
        (big, [(0, 0, 399, 319), (10, 10, 30, 30)], ["", "mabel"], "iterative · seed 0 · count mismatch"),
    ]
    grid = annotated_grid(items, columns=2, cell_size=128, gutter=6)
    assert grid.width == 2 * 128 + 6
    row_step = (grid.height + 6) // 2
    assert row_step > 128 + 6  # two rows of cells, each with a caption strip
    out = pixels(grid)
    assert (out[:, 128:134] == 255).all()  # white gutter between the columns
    # Box of the first item scaled to the 128 px thumbnail (factor 0.32): left edge at x≈13, rows 19..96.
    assert ((out[40:90, 11:16] == (255, 0, 0)).all(axis=2)).any()
    caption_strip = out[128 : row_step - 6, 0:128]
    assert (caption_strip.sum(axis=2) < 200).any()  # dark caption text under the first cell


def test_annotated_grid_empty() -> None:
    grid = annotated_grid([], columns=3, cell_size=96)
    assert grid.width == 96 and grid.height > 0
