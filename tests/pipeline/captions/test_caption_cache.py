"""Caption cache: keyed by image hash, backend, model and prompt version; token phrase applied after."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from PIL import Image

from pipeline.captions import (
    PROMPT_VERSION,
    CaptionCache,
    Captioner,
    TemplateCaptioner,
    caption_image,
    caption_key,
)
from pipeline.errors import CaptionError

IMAGE_SHA = "a" * 64
OTHER_SHA = "b" * 64


@dataclass
class CountingCaptioner:
    """Stands in for a paid backend: records how often it is really called."""

    backend: str = "fake"
    model: str = "fake-model"
    prompt_version: str = PROMPT_VERSION
    reply: str = '  "A brown dog sitting on green grass."  '
    calls: int = 0

    def caption(self, image: Image.Image, class_noun: str) -> str:
        self.calls += 1
        return self.reply


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (16, 16), (120, 80, 40))


def test_second_call_hits_cache_and_skips_backend(tmp_path: Path, image: Image.Image) -> None:
    captioner = CountingCaptioner()
    cache = CaptionCache(tmp_path / "captions")

    first = caption_image(captioner, cache, image, IMAGE_SHA, "dog", "olis dog")
    second = caption_image(captioner, cache, image, IMAGE_SHA, "dog", "olis dog")

    assert captioner.calls == 1
    assert not first.cached and second.cached
    assert first.raw == second.raw == "A brown dog sitting on green grass."
    assert first.text == second.text == "A brown olis dog sitting on green grass."
    assert first.cache_key == second.cache_key


def test_token_phrase_change_reuses_raw_caption(tmp_path: Path, image: Image.Image) -> None:
    captioner = CountingCaptioner()
    cache = CaptionCache(tmp_path)

    first = caption_image(captioner, cache, image, IMAGE_SHA, "dog", "olis dog")
    second = caption_image(captioner, cache, image, IMAGE_SHA, "dog", "zwx dog")

    assert captioner.calls == 1
    assert second.cached and second.cache_key == first.cache_key
    assert second.text == "A brown zwx dog sitting on green grass."


def test_cache_persists_across_instances(tmp_path: Path, image: Image.Image) -> None:
    captioner = CountingCaptioner()
    caption_image(captioner, CaptionCache(tmp_path), image, IMAGE_SHA, "dog", "olis dog")
    again = caption_image(captioner, CaptionCache(tmp_path), image, IMAGE_SHA, "dog", "olis dog")
    assert again.cached and captioner.calls == 1


@pytest.mark.parametrize(
    "change",
    [{"backend": "other"}, {"model": "other-model"}, {"prompt_version": "v2"}],
)
def test_key_changes_with_backend_model_and_prompt_version(change: dict[str, str]) -> None:
    base = CountingCaptioner()
    assert caption_key(IMAGE_SHA, base, "dog") != caption_key(IMAGE_SHA, replace(base, **change), "dog")


def test_key_changes_with_image_hash_and_class_noun() -> None:
    captioner = CountingCaptioner()
    key = caption_key(IMAGE_SHA, captioner, "dog")
    assert key != caption_key(OTHER_SHA, captioner, "dog")
    assert key != caption_key(IMAGE_SHA, captioner, "cat")
    assert key == caption_key(IMAGE_SHA, CountingCaptioner(), "dog")
    assert len(key) == 64 and int(key, 16) >= 0


def test_changed_model_calls_backend_again(tmp_path: Path, image: Image.Image) -> None:
    cache = CaptionCache(tmp_path)
    first, second = CountingCaptioner(), CountingCaptioner(model="bigger-model")
    caption_image(first, cache, image, IMAGE_SHA, "dog", "olis dog")
    result = caption_image(second, cache, image, IMAGE_SHA, "dog", "olis dog")
    assert second.calls == 1 and not result.cached


def test_entry_is_one_json_file_with_meta_and_no_temp_files(tmp_path: Path, image: Image.Image) -> None:
    cache = CaptionCache(tmp_path)
    result = caption_image(CountingCaptioner(), cache, image, IMAGE_SHA, "dog", "olis dog")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [cache.path_for(result.cache_key)]
    entry = json.loads(files[0].read_text())
    assert entry["raw_caption"] == result.raw
    assert entry["meta"]["backend"] == "fake" and entry["meta"]["image_sha256"] == IMAGE_SHA


def test_corrupt_entry_is_recomputed(tmp_path: Path, image: Image.Image) -> None:
    captioner = CountingCaptioner()
    cache = CaptionCache(tmp_path)
    result = caption_image(captioner, cache, image, IMAGE_SHA, "dog", "olis dog")
    cache.path_for(result.cache_key).write_text("{not json")

    again = caption_image(captioner, cache, image, IMAGE_SHA, "dog", "olis dog")
    assert captioner.calls == 2 and not again.cached
    assert cache.get(result.cache_key) == result.raw  # rewritten


@pytest.mark.parametrize("bad_key", ["../../etc/passwd", "A" * 64, "abc", ""])
def test_unsafe_keys_are_rejected(tmp_path: Path, bad_key: str) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        CaptionCache(tmp_path).get(bad_key)


def test_template_captioner_through_cache(tmp_path: Path, image: Image.Image) -> None:
    captioner = TemplateCaptioner()
    assert isinstance(captioner, Captioner)
    result = caption_image(captioner, CaptionCache(tmp_path), image, IMAGE_SHA, "toy robot", "olis toy robot")
    assert result.raw == "a photo of a toy robot"
    assert result.text == "a photo of a olis toy robot"


def test_template_text_is_part_of_the_key() -> None:
    default, custom = TemplateCaptioner(), TemplateCaptioner("a close-up photo of a {class_noun}")
    assert custom.caption(Image.new("RGB", (4, 4)), "cat") == "a close-up photo of a cat"
    assert caption_key(IMAGE_SHA, default, "cat") != caption_key(IMAGE_SHA, custom, "cat")


@pytest.mark.parametrize("template", ["a photo", "a {thing} photo of a {class_noun}", "a {class_noun"])
def test_bad_template_is_rejected(template: str) -> None:
    with pytest.raises(CaptionError, match="template"):
        TemplateCaptioner(template)
