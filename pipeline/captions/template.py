"""Deterministic captions without a model: the DreamBooth "a photo of a {class_noun}" baseline."""

from __future__ import annotations

from PIL import Image

from pipeline.captions.base import PROMPT_VERSION
from pipeline.errors import CaptionError

DEFAULT_TEMPLATE = "a photo of a {class_noun}"


class TemplateCaptioner:
    backend = "template"

    def __init__(self, template: str = DEFAULT_TEMPLATE) -> None:
        try:
            rendered = template.format(class_noun="\0")
        except (KeyError, IndexError, ValueError) as exc:
            raise CaptionError(
                f"Caption template {template!r} is not a valid format string ({exc!r}); "
                "use {class_noun} as its only placeholder and double any other braces."
            ) from exc
        if "\0" not in rendered:
            raise CaptionError(
                f"Caption template {template!r} must contain '{{class_noun}}', "
                "so the token phrase can replace the class noun."
            )
        self.template = template
        self.model = ""
        # The template text decides the caption, so it is part of the version (and thus of the cache key).
        self.prompt_version = PROMPT_VERSION if template == DEFAULT_TEMPLATE else f"{PROMPT_VERSION}:{template}"

    def caption(self, image: Image.Image, class_noun: str) -> str:
        return self.template.format(class_noun=" ".join(class_noun.split()))
