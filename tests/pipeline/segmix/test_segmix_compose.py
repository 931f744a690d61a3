from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.segmix.compose import (
    SegMixConfig,
    SegMixError,
    SegMixSubject,
    compose,
    config_hash,
    join_phrases,
    prepare_subjects,
)

RED = (220, 30, 30)
BLUE = (30, 40, 210)
GREEN = (20, 180, 40)
SMALL = SegMixConfig(canvas=(256, 256))


def ellipse_cutout(
    width: int, height: int, colour: tuple[int, int, int], soft: bool = False, junk: bool = False
) -> Image.Image:
    """A solid-colour ellipse cut-out. ``soft``: alpha ramps down over the outer eighth of the radius;
    ``junk``: transparent pixels carry a loud colour that must never reach the composite."""
    yy, xx = np.mgrid[0:height, 0:width]
    radius = np.sqrt(((xx + 0.5) / (width / 2) - 1) ** 2 + ((yy + 0.5) / (height / 2) - 1) ** 2)
    alpha = np.clip((1 - radius) * 8, 0, 1) if soft else (radius <= 1).astype(float)
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = colour
    if junk:
        rgba[alpha == 0, :3] = (0, 255, 0)
    elif not soft:
        rgba[alpha == 0, :3] = 0
    rgba[..., 3] = np.round(alpha * 255).astype(np.uint8)
    return Image.fromarray(rgba)


def pair(**kwargs: bool) -> list[SegMixSubject]:
    return [
        SegMixSubject(ellipse_cutout(180, 150, RED, **kwargs), "olis dog", "dog6"),
        SegMixSubject(ellipse_cutout(140, 200, BLUE, **kwargs), "sks dog", "dog2"),
    ]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def assert_coloured_as(image: np.ndarray, mask: np.ndarray, own: tuple, others: tuple) -> None:
    """Every pixel under ``mask`` is nearer ``own`` colour than any other subject's (bicubic edges ring a
    little, so exact equality would test the filter, not the paste)."""
    values = image[mask]
    near_own = np.abs(values - np.array(own)).sum(axis=1)
    for other in others:
        assert (near_own < np.abs(values - np.array(other)).sum(axis=1)).all()


def test_sizes_modes_and_masks_match_canvas() -> None:
    config = SegMixConfig(canvas=(320, 224))
    result = compose(pair(), config, seed=3)
    assert result.image.mode == "RGB"
    assert result.image.size == (320, 224)
    assert len(result.masks) == 2
    for mask in [*result.masks, result.union_mask]:
        assert mask.shape == (224, 320)
        assert mask.dtype == bool
    assert sorted(result.order) == [0, 1]
    assert result.attempts >= 1


def test_same_seed_same_bytes_and_other_seed_differs() -> None:
    first, again = compose(pair(), SMALL, seed=11), compose(pair(), SMALL, seed=11)
    assert first.image.tobytes() == again.image.tobytes()
    assert all(np.array_equal(a, b) for a, b in zip(first.masks, again.masks, strict=True))
    assert (first.boxes, first.prompt, first.scales) == (again.boxes, again.prompt, again.scales)
    other = compose(pair(), SMALL, seed=12)
    assert other.image.tobytes() != first.image.tobytes()


def test_prepared_subjects_give_identical_output() -> None:
    config = SegMixConfig(canvas=(256, 256))
    big = [  # larger than the canvas, so the prepared working copy is downscaled once
        SegMixSubject(ellipse_cutout(600, 500, RED), "a"),
        SegMixSubject(ellipse_cutout(500, 700, BLUE), "b"),
    ]
    prepared = prepare_subjects(big, config)
    assert prepared[0].working.width < 600
    for seed in range(3):
        assert compose(prepared, config, seed).image.tobytes() == compose(big, config, seed).image.tobytes()
    # prepared for another canvas: re-prepared, same result as from scratch
    other = SegMixConfig(canvas=(512, 384))
    assert compose(prepared, other, 5).image.tobytes() == compose(big, other, 5).image.tobytes()


@pytest.mark.parametrize("background", ["white", "black", (12, 200, 99)])
def test_background_is_exact_outside_union_even_with_soft_alpha(
    background: str | tuple[int, int, int],
) -> None:
    config = SegMixConfig(canvas=(256, 256), background=background)
    rgb = np.array(config.background_rgb)
    for seed in range(4):
        result = compose(pair(soft=True, junk=True), config, seed)
        image = pixels(result.image)
        assert (image[~result.union_mask] == rgb).all()
        # no junk green and no dark fringe: every visible pixel is its subject's colour, give or take
        # the rounding of premultiplied edge pixels
        for mask, colour in zip(result.masks, (RED, BLUE), strict=True):
            assert np.abs(image[mask] - np.array(colour)).max() <= 8


def test_visible_masks_are_disjoint_and_union_is_their_or() -> None:
    config = SegMixConfig(canvas=(256, 256), max_occlusion=0.6)
    for seed in range(6):
        result = compose(pair(), config, seed)
        stacked = np.stack(result.masks).astype(int)
        assert stacked.sum(axis=0).max() <= 1
        assert np.array_equal(np.logical_or.reduce(result.masks), result.union_mask)
        assert all(mask.any() for mask in result.masks)


def test_later_pasted_subject_wins_overlaps() -> None:
    config = SegMixConfig(canvas=(256, 256), max_occlusion=1.0, min_subject_fraction=0.0)
    overlapping = 0
    for seed in range(40):
        result = compose(pair(), config, seed)
        last = result.order[-1]
        assert result.occlusion[last] == 0.0
        colours = (RED, BLUE)
        assert_coloured_as(pixels(result.image), result.masks[last], colours[last], (colours[1 - last],))
        overlapping += max(result.occlusion) > 0
    assert overlapping > 0, "no overlapping layout in 40 seeds: the test exercised nothing"


def test_occlusion_values_match_the_visible_masks() -> None:
    config = SegMixConfig(canvas=(256, 256), max_occlusion=1.0, min_subject_fraction=0.0)
    for seed in range(10):
        result = compose(pair(), config, seed)
        for index, mask in enumerate(result.masks):
            x0, y0, x1, y1 = result.boxes[index]
            assert not mask[:y0].any() and not mask[y1:].any()
            assert not mask[:, :x0].any() and not mask[:, x1:].any()
            # pasted area of an ellipse filling its box is about pi/4 of the box
            full = np.pi / 4 * (x1 - x0) * (y1 - y0)
            assert result.occlusion[index] == pytest.approx(1 - mask.sum() / full, abs=0.03)


def test_overlap_budget_is_respected_and_actually_binds() -> None:
    wide = [SegMixSubject(ellipse_cutout(240, 120, c), p) for c, p in ((RED, "a"), (BLUE, "b"))]
    free = SegMixConfig(canvas=(256, 256), max_occlusion=1.0, min_subject_fraction=0.0)
    budget = dataclasses.replace(free, max_occlusion=0.05)
    unconstrained = [max(compose(wide, free, seed).occlusion) for seed in range(60)]
    assert max(unconstrained) > 0.05, "layouts never overlap, so the budget would be untested"
    constrained = [compose(wide, budget, seed) for seed in range(60)]
    assert max(max(c.occlusion) for c in constrained) <= 0.05
    assert max(c.attempts for c in constrained) > 1


def test_impossible_budget_raises_after_max_tries() -> None:
    # full-height rectangles filling their columns overlap unless both inward shifts are tiny
    tall = [SegMixSubject(Image.new("RGBA", (60, 124), (*c, 255)), p) for c, p in ((RED, "a"), (BLUE, "b"))]
    config = SegMixConfig(canvas=(64, 64), max_occlusion=0.0, max_tries=2, scale_range=(1.0, 1.0))
    for seed in range(20):
        try:
            compose(tall, config, seed)
        except SegMixError as error:
            assert "max_occlusion" in str(error) and "2 tries" in str(error)
            return
    pytest.fail("expected SegMixError for an over-tight overlap budget")


def test_k3_composes_three_subjects() -> None:
    config = SegMixConfig(canvas=(384, 256), k=3)
    subjects = [*pair(), SegMixSubject(ellipse_cutout(120, 160, GREEN), "zwx toy", "toy")]
    result = compose(subjects, config, seed=2)
    assert len(result.masks) == 3 and sorted(result.order) == [0, 1, 2]
    assert np.stack(result.masks).astype(int).sum(axis=0).max() <= 1
    assert all(mask.sum() / (384 * 256) >= config.min_subject_fraction for mask in result.masks)
    fit_w = 384 / 3 - 384 / 32
    assert all(x1 - x0 <= fit_w + 1 for x0, _, x1, _ in result.boxes)
    assert result.prompt.count(",") >= 2 and " and " in result.prompt
    for phrase in ("olis dog", "sks dog", "zwx toy"):
        assert phrase in result.prompt


def test_mudi_placement_for_two_subjects_at_1024() -> None:
    """MuDI: fit (512-32)x(1024-32), scale U(0.75, 1) of it, left x = randint(1, 256), right ends at
    1024 - randint(1, 256)."""
    subjects = [
        SegMixSubject(ellipse_cutout(400, 350, RED), "a"),
        SegMixSubject(ellipse_cutout(300, 450, BLUE), "b"),
    ]
    for seed in range(15):
        result = compose(subjects, SegMixConfig(), seed)
        left, right = sorted(result.boxes)
        assert 1 <= left[0] <= 257
        assert 1024 - 257 <= right[2] <= 1023
        for x0, y0, x1, y1 in result.boxes:
            fraction = max((x1 - x0) / 480, (y1 - y0) / 992)
            assert 0.74 <= fraction <= 1.005


def test_max_upscale_limits_tiny_cutouts_and_min_size_rejects_them() -> None:
    tiny = [SegMixSubject(ellipse_cutout(20, 30, RED), "a"), SegMixSubject(ellipse_cutout(24, 24, BLUE), "b")]
    lenient = SegMixConfig(min_subject_fraction=0.0, max_upscale=2.0)
    for seed in range(5):
        result = compose(tiny, lenient, seed)
        assert max(result.scales) <= 2.0
        (ax0, ay0, ax1, ay1), (bx0, _, bx1, _) = result.boxes
        assert ay1 - ay0 <= 60 and ax1 - ax0 <= 40 and bx1 - bx0 <= 48
    with pytest.raises(SegMixError, match="min_subject_fraction"):
        compose(tiny, SegMixConfig(), seed=0)


def test_min_subject_fraction_holds() -> None:
    config = SegMixConfig(canvas=(256, 256), min_subject_fraction=0.08, max_occlusion=1.0)
    for seed in range(20):
        result = compose(pair(), config, seed)
        assert min(mask.sum() for mask in result.masks) / (256 * 256) >= 0.08


def test_relative_scale_keeps_the_height_ratio() -> None:
    subjects = [
        SegMixSubject(ellipse_cutout(150, 130, RED), "olis dog", "dog6"),
        SegMixSubject(ellipse_cutout(100, 180, BLUE), "zwx toy", "toy"),
    ]
    config = SegMixConfig(canvas=(512, 512), relative_scale={"dog6": 2.0, "zwx toy": 1.0}, min_subject_fraction=0.01)
    for seed in range(8):
        dog, toy = compose(subjects, config, seed).boxes
        assert (dog[3] - dog[1]) / (toy[3] - toy[1]) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(SegMixError, match="relative_scale has no entry"):
        compose(subjects, dataclasses.replace(config, relative_scale={"dog6": 2.0}), seed=0)


def test_non_square_canvas() -> None:
    config = SegMixConfig(canvas=(768, 512))
    for seed in range(5):
        result = compose(pair(), config, seed)
        assert result.image.size == (768, 512)
        assert all(m.shape == (512, 768) for m in result.masks)
        for x0, y0, x1, y1 in result.boxes:
            assert 0 <= x0 < x1 <= 768 and 0 <= y0 < y1 <= 512
            assert x1 - x0 <= 768 / 2 - 768 / 32 + 1 and y1 - y0 <= 512 - 512 / 32 + 1


@pytest.mark.parametrize(
    ("background", "word"),
    [("white", "white"), ("black", "black"), ((12, 200, 99), "solid-colour"), ((255, 255, 255), "white")],
)
def test_prompt_names_every_phrase_and_the_background(background: object, word: str) -> None:
    config = SegMixConfig(canvas=(256, 256), background=background)
    result = compose(pair(), config, seed=1)
    assert "olis dog" in result.prompt and "sks dog" in result.prompt
    assert f"{word} background" in result.prompt
    assert result.prompt.startswith("A photo of ")


def test_prompt_order_is_shuffled_independently_of_placement_unless_disabled() -> None:
    orders = {compose(pair(), SMALL, seed).prompt.index("sks") < 20 for seed in range(20)}
    assert orders == {True, False}
    fixed = dataclasses.replace(SMALL, shuffle_prompt_order=False)
    assert {compose(pair(), fixed, seed).prompt for seed in range(5)} == {
        "A photo of olis dog and sks dog, simple white background."
    }


def test_plain_images_get_placeholder_phrases() -> None:
    result = compose([ellipse_cutout(100, 90, RED), ellipse_cutout(90, 100, BLUE)], SMALL, seed=0)
    assert sorted(result.phrases) == ["[V1]", "[V2]"]
    assert "[V1]" in result.prompt and "[V2]" in result.prompt


def test_join_phrases() -> None:
    assert join_phrases(["a"]) == "a"
    assert join_phrases(["a", "b"]) == "a and b"
    assert join_phrases(["a", "b", "c"]) == "a, b and c"


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(SegMixError, match="k is 2"):
        compose(pair()[:1], SMALL)
    with pytest.raises(SegMixError, match="RGBA"):
        compose([pair()[0].image.convert("RGB"), pair()[1]], SMALL)
    empty = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    with pytest.raises(SegMixError, match="no opaque pixels"):
        compose([pair()[0], SegMixSubject(empty, "ghost")], SMALL)
    with pytest.raises(SegMixError, match="SegMixSubject or an RGBA"):
        compose([pair()[0], "not an image"], SMALL)  # type: ignore[list-item]
    assert issubclass(SegMixError, CastloraError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 1},
        {"scale_range": (0.0, 1.0)},
        {"scale_range": (0.9, 0.8)},
        {"max_occlusion": 1.5},
        {"background": "purple"},
        {"background": (300, 0, 0)},
        {"prompt_template": "no placeholder"},
        {"relative_scale": {"a": 0.0}},
        {"k": 40},
        {"max_tries": 0},
        {"resample": "nearest-ish"},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(SegMixError):
        SegMixConfig(**kwargs)


def test_config_hash_tracks_settings() -> None:
    assert config_hash(SegMixConfig()) == config_hash(SegMixConfig())
    assert config_hash(SegMixConfig()) != config_hash(SegMixConfig(max_occlusion=0.2))
    assert config_hash(SegMixConfig(relative_scale={"a": 1.0, "b": 2.0})) == config_hash(
        SegMixConfig(relative_scale={"b": 2.0, "a": 1.0})
    )


def test_resample_filter_changes_pixels_not_layout() -> None:
    bicubic = compose(pair(), SMALL, seed=4)
    bilinear = compose(pair(), dataclasses.replace(SMALL, resample="bilinear"), seed=4)
    assert bicubic.boxes == bilinear.boxes and bicubic.order == bilinear.order
    assert bicubic.image.tobytes() != bilinear.image.tobytes()
