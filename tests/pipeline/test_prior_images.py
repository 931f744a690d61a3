"""Class image generation: per-index seeds make images independent of batching and resumable."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.families import load_base_pipeline
from pipeline.models.base_model import BaseModelSpec
from pipeline.prior_images import ClassImageConfig, generate_class_images, list_class_image_files

TINY = ClassImageConfig(count=3, resolution=64, steps=2, guidance_scale=5.0, seed=7, batch_size=3)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_base_pipeline(BaseModelSpec(source="tiny:sdxl"), tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="module")
def reference_run(tiny_pipe: Any) -> list[tuple[int, int, np.ndarray]]:
    """One batched run of TINY that the other tests compare against."""
    return [(index, seed, np.asarray(image)) for index, seed, image in generate_class_images(tiny_pipe, "dog", TINY)]


def pixels_by_index(pipe: Any, config: ClassImageConfig, **kwargs: Any) -> dict[int, np.ndarray]:
    return {index: np.asarray(image) for index, _, image in generate_class_images(pipe, "dog", config, **kwargs)}


def test_count_indices_seeds_and_size(reference_run: list[tuple[int, int, np.ndarray]]) -> None:
    assert [index for index, _, _ in reference_run] == [0, 1, 2]
    assert [seed for _, seed, _ in reference_run] == [7, 8, 9]
    assert all(pixels.shape == (64, 64, 3) for _, _, pixels in reference_run)
    # Different seeds give different pictures.
    assert not np.array_equal(reference_run[0][2], reference_run[1][2])


def test_same_config_gives_identical_pixels(tiny_pipe: Any, reference_run: list) -> None:
    again = pixels_by_index(tiny_pipe, TINY)
    assert all(np.array_equal(again[index], pixels) for index, _, pixels in reference_run)


def assert_same_picture(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float rounding of batched kernels: at most one grey level on under 1% of values."""
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.01


def test_image_depends_only_on_its_seed_not_on_batching(tiny_pipe: Any, reference_run: list) -> None:
    one_by_one = pixels_by_index(tiny_pipe, replace(TINY, batch_size=1))
    for index, _, pixels in reference_run:
        assert_same_picture(one_by_one[index], pixels)
    # Shifting the base seed by one shifts the images by one index: image i is a function of seed + i.
    shifted = pixels_by_index(tiny_pipe, replace(TINY, seed=TINY.seed + 1, count=2, batch_size=2))
    assert_same_picture(shifted[0], reference_run[1][2])
    assert_same_picture(shifted[1], reference_run[2][2])
    # ... and the tolerance above is far below the difference between two seeds.
    assert np.abs(shifted[0].astype(int) - reference_run[0][2].astype(int)).mean() > 10


def test_resume_reproduces_missing_images_bit_exactly(tiny_pipe: Any, reference_run: list) -> None:
    resumed = list(generate_class_images(tiny_pipe, "dog", TINY, skip_indices={0}))
    assert [(index, seed) for index, seed, _ in resumed] == [(1, 8), (2, 9)]
    for index, _, image in resumed:
        assert np.array_equal(np.asarray(image), reference_run[index][2])


class RecordingPipe:
    """Stands in for a diffusers pipeline to check exactly what generate_class_images asks for."""

    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(kwargs)
        size = (kwargs["width"], kwargs["height"])
        return SimpleNamespace(images=[Image.new("RGB", size) for _ in kwargs["prompt"]])


def test_prompts_batches_and_settings_are_passed_through() -> None:
    pipe = RecordingPipe()
    config = ClassImageConfig(count=5, resolution=128, steps=3, guidance_scale=6.5, batch_size=2)
    results = list(generate_class_images(pipe, "toy robot", config))
    assert [index for index, _, _ in results] == [0, 1, 2, 3, 4]
    assert [len(call["prompt"]) for call in pipe.calls] == [2, 2, 1]
    first = pipe.calls[0]
    assert first["prompt"] == ["a photo of a toy robot"] * 2
    assert first["negative_prompt"] is None  # empty -> SDXL's zeroed unconditional embedding
    assert (first["height"], first["width"], first["num_inference_steps"]) == (128, 128, 3)
    assert first["guidance_scale"] == 6.5
    assert [g.initial_seed() for call in pipe.calls for g in call["generator"]] == [0, 1, 2, 3, 4]


def test_resume_recomputes_only_chunks_with_missing_images() -> None:
    pipe = RecordingPipe()
    config = ClassImageConfig(count=7, resolution=64, steps=2, guidance_scale=5.0, batch_size=3)
    results = list(generate_class_images(pipe, "dog", config, skip_indices={0, 1, 2, 3, 5}))
    assert [index for index, _, _ in results] == [4, 6]
    # Chunk [0, 3) is complete and skipped; [3, 6) is recomputed whole so index 4 sees the same batch.
    assert [[g.initial_seed() for g in call["generator"]] for call in pipe.calls] == [[3, 4, 5], [6]]


def test_template_and_negative_prompt() -> None:
    pipe = RecordingPipe()
    config = ClassImageConfig(
        count=1,
        prompt_template="{class_noun} {{studio}}",
        negative_prompt="blurry",
        resolution=64,
        steps=2,
        guidance_scale=5.0,
    )
    list(generate_class_images(pipe, "cat", config))
    assert pipe.calls[0]["prompt"] == ["cat {{studio}}"]
    assert pipe.calls[0]["negative_prompt"] == ["blurry"]


def test_zero_count_generates_nothing() -> None:
    pipe = RecordingPipe()
    assert list(generate_class_images(pipe, "dog", replace(TINY, count=0))) == []
    assert pipe.calls == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("count", -1), ("resolution", 100), ("steps", 0), ("batch_size", 0), ("prompt_template", "a dog")],
)
def test_invalid_config_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(CastloraError, match=field):
        ClassImageConfig(**{field: value})


def test_list_class_image_files_sorted_images_only(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.webp", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [path.name for path in list_class_image_files(tmp_path)] == ["a.JPG", "b.png", "c.webp"]


def test_list_class_image_files_missing_or_empty_names_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "class_images" / "dog"
    with pytest.raises(CastloraError, match=re.escape(str(missing))):
        list_class_image_files(missing)
    missing.mkdir(parents=True)
    (missing / "readme.txt").write_text("no images here")
    with pytest.raises(CastloraError, match=re.escape(str(missing))):
        list_class_image_files(missing)
