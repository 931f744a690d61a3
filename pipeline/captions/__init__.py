"""Captioning reference photos (docs/design.md#captioning): backends, the caption cache and token-phrase substitution.

The OpenAI and transformers backends are imported lazily: importing this package stays cheap, and
``openai``/``torch`` are only loaded when such a captioner is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.captions.base import (
    CAPTION_INSTRUCTION,
    PROMPT_VERSION,
    Captioner,
    CaptionResult,
    apply_token_phrase,
    caption_image,
    caption_key,
)
from pipeline.captions.cache import CaptionCache
from pipeline.captions.template import TemplateCaptioner

_LAZY = {
    "OpenAICaptioner": "pipeline.captions.openai_backend",
    "OpenAICaptionerConfig": "pipeline.captions.openai_backend",
    "TransformersCaptioner": "pipeline.captions.transformers_backend",
}

__all__ = [
    "CAPTION_INSTRUCTION",
    "PROMPT_VERSION",
    "CaptionCache",
    "CaptionResult",
    "Captioner",
    "OpenAICaptioner",
    "OpenAICaptionerConfig",
    "TemplateCaptioner",
    "TransformersCaptioner",
    "apply_token_phrase",
    "caption_image",
    "caption_key",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
