"""Transformers backend with the tiny random-init BLIP model built into a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.captions import CaptionCache, TransformersCaptioner, caption_image
from pipeline.errors import ModelLoadError
from pipeline.models.tiny_vlm import build_tiny_chat_vlm, build_tiny_vlm, tiny_vocab


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("tiny-vlm")
    build_tiny_vlm(target)
    return target


@pytest.fixture(scope="module")
def captioner(tiny_vlm_dir: Path) -> TransformersCaptioner:
    return TransformersCaptioner(str(tiny_vlm_dir), max_new_tokens=8)


def photo(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (80, 60), colour)


def test_tiny_vlm_is_saved_and_loads_back(tiny_vlm_dir: Path) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    assert (tiny_vlm_dir / "config.json").is_file() and (tiny_vlm_dir / "model.safetensors").is_file()
    model = BlipForConditionalGeneration.from_pretrained(tiny_vlm_dir)
    processor = BlipProcessor.from_pretrained(tiny_vlm_dir)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert len(processor.tokenizer) == len(tiny_vocab())
    ids = processor.tokenizer("a photo of a dog on grass").input_ids
    assert processor.tokenizer.unk_token_id not in ids


def test_caption_is_deterministic_and_starts_with_prompt(captioner: TransformersCaptioner) -> None:
    image = photo((200, 40, 40))
    first = captioner.caption(image, "dog")
    second = captioner.caption(image, "dog")
    assert first == second
    # BLIP continues the conditional prompt, so the caption names the class noun.
    assert first.startswith("a photo of a dog")
    assert captioner.mode == "conditional"
    assert captioner.backend == "transformers" and captioner.model == captioner.source


def test_caption_image_with_transformers_backend(captioner: TransformersCaptioner, tmp_path: Path) -> None:
    cache = CaptionCache(tmp_path)
    result = caption_image(captioner, cache, photo((10, 90, 200)), "d" * 64, "dog", "olis dog")
    assert "olis dog" in result.text and not result.cached
    assert caption_image(captioner, cache, photo((10, 90, 200)), "d" * 64, "dog", "olis dog").cached


def test_wrong_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        TransformersCaptioner(str(missing))


def test_directory_without_model_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        TransformersCaptioner(str(tmp_path))


def test_unknown_hub_id_offline_is_a_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="castlora-test/no-such-caption-model"):
        TransformersCaptioner("castlora-test/no-such-caption-model")


@pytest.fixture(scope="module")
def chat_captioner(tmp_path_factory: pytest.TempPathFactory) -> TransformersCaptioner:
    target = tmp_path_factory.mktemp("tiny-chat-vlm")
    build_tiny_chat_vlm(target)
    return TransformersCaptioner(str(target), max_new_tokens=6)


def test_chat_vlm_uses_chat_template_and_returns_only_the_reply(
    chat_captioner: TransformersCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = photo((30, 160, 70))
    assert chat_captioner.mode == "chat"
    processor = chat_captioner._processor
    seen: list[list[dict]] = []
    original = processor.apply_chat_template

    def spy(messages, **kwargs):
        seen.append(messages)
        return original(messages, **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", spy)
    first = chat_captioner.caption(image, "dog")

    assert first == chat_captioner.caption(image, "dog")
    content = seen[0][0]["content"]
    assert [item["type"] for item in content] == ["image", "text"]
    assert "the dog" in content[1]["text"]
    # Only the generated reply is returned, never the prompt ("user : <image> write one ...").
    assert not first.startswith("user") and "comprehensive" not in first
    assert len(first.split()) <= 6
