"""Captions from a local vision-language model loaded with transformers (no network, no API key).

Two families are supported:
- captioning models such as BLIP, prompted with "a photo of a {class_noun}" so the caption starts with the
  class noun (which the token phrase then replaces);
- chat VLMs (Qwen2-VL, SmolVLM, LLaVA, ...) whose processor has a chat template: they get the same
  instruction as the OpenAI backend.
Decoding is greedy so the same image always gets the same caption.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.captions.base import PROMPT_VERSION, clean_caption, instruction_for
from pipeline.errors import CaptionError, ModelLoadError
from pipeline.images import to_rgb
from pipeline.models.inputs import to_device
from pipeline.models.loading import load_pretrained

log = logging.getLogger(__name__)

CONDITIONAL_PROMPT = "a photo of a {class_noun}"
"""Prefix for captioning models: they continue it, so the caption names the class noun."""

_WHAT = "transformers caption model"


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


class TransformersCaptioner:
    backend = "transformers"

    def __init__(
        self,
        source: str,
        device: str = "cpu",
        max_new_tokens: int = 40,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``source`` is a local directory or a hub id already in the local HF cache.

        The config is read now (so a wrong path fails early with ModelLoadError); weights load on the first
        caption, so a run whose captions are all cached never pays for loading the model.
        """
        from transformers import AutoConfig

        source = str(source)
        if _looks_like_path(source) and not (Path(source).expanduser() / "config.json").is_file():
            raise ModelLoadError(
                f"{_WHAT}: {source} is not a saved model directory (no config.json there). Point the "
                "caption model at a folder written by save_pretrained, or at a hub id in the local cache."
            )
        self.source = source
        self.model = source
        self.prompt_version = PROMPT_VERSION
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        self.config = load_pretrained(AutoConfig.from_pretrained, source, _WHAT)
        self._model: Any = None
        self._processor: Any = None
        self._chat = False

    # --- loading -----------------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        import transformers

        if self.config.model_type == "blip":
            model_cls, processor_cls = transformers.BlipForConditionalGeneration, transformers.BlipProcessor
        else:
            model_cls, processor_cls = transformers.AutoModelForImageTextToText, transformers.AutoProcessor
        processor = load_pretrained(processor_cls.from_pretrained, self.source, _WHAT)
        model = load_pretrained(model_cls.from_pretrained, self.source, _WHAT, dtype=self.dtype)
        self._processor = processor
        self._model = model.to(self.device).eval()
        self._chat = self.config.model_type != "blip" and bool(getattr(processor, "chat_template", None))
        log.info(
            "Loaded caption model %s (%s, %s mode) on %s",
            self.source,
            type(model).__name__,
            self.mode,
            self.device,
        )

    @property
    def mode(self) -> str:
        """ "chat" (instruction through the chat template) or "conditional" (BLIP-style prompt prefix)."""
        self._load()
        return "chat" if self._chat else "conditional"

    # --- captioning --------------------------------------------------------------------------------------

    def caption(self, image: Image.Image, class_noun: str) -> str:
        self._load()
        rgb = to_rgb(image)
        inputs, prompt_length = (
            self._chat_inputs(rgb, class_noun) if self._chat else self._conditional_inputs(rgb, class_noun)
        )
        generation = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1}
        try:
            with torch.inference_mode():
                output = self._model.generate(**inputs, **generation)
        except (RuntimeError, ValueError) as exc:
            raise CaptionError(f"{_WHAT} {self.source} failed to generate a caption: {exc}") from exc
        tokens = output[0][prompt_length:]
        return clean_caption(self._processor.decode(tokens, skip_special_tokens=True))

    def _conditional_inputs(self, image: Image.Image, class_noun: str) -> tuple[dict[str, Any], int]:
        # BLIP-style decoders echo the prompt, and it is part of the caption ("a photo of a dog on grass").
        prompt = CONDITIONAL_PROMPT.format(class_noun=" ".join(class_noun.split()))
        inputs = self._processor(images=image, text=prompt, return_tensors="pt")
        return to_device(inputs, self.device, self.dtype), 0

    def _chat_inputs(self, image: Image.Image, class_noun: str) -> tuple[dict[str, Any], int]:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": instruction_for(class_noun)},
                ],
            }
        ]
        inputs = self._processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        # Chat models return prompt + reply; only the reply is the caption.
        return to_device(inputs, self.device, self.dtype), int(inputs["input_ids"].shape[1])
