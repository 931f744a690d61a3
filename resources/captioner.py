"""Captioning backends as a resource: an OpenAI-compatible API, a local VLM, or a template."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import ConfigDict

from pipeline.captions import Captioner
from pipeline.errors import CastloraError

if TYPE_CHECKING:
    from pipeline.captions.openai_backend import OpenAICaptioner

BACKENDS = ("template", "openai", "transformers")


class CaptionerResource(dg.ConfigurableResource):
    """Captions for the photos: the ``template`` backend, an OpenAI-compatible API or a local VLM."""

    # The docstrings under the fields are the launchpad's field descriptions.
    model_config = ConfigDict(use_attribute_docstrings=True)

    backend: str = "template"
    """``template`` (deterministic, no model), ``openai`` (any OpenAI-compatible endpoint) or ``transformers``."""
    model: str = ""
    """openai: model name (default gpt-4o-mini); transformers: hub id, local dir or tiny:vlm (default: the preset's)."""
    base_url: str = ""
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:11434/v1 for Ollama; empty: api.openai.com."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key. The key itself is never stored in config."""
    timeout_s: float = 60.0
    """openai: seconds per request before it is retried."""
    max_retries: int = 4
    """openai: retries (with backoff) on timeouts, 429 and 5xx."""
    template: str = "a photo of a {class_noun}"
    """template: the caption; ``{class_noun}`` is the character's class noun (replaced by its token phrase)."""
    device: str = "cpu"
    """transformers: device of the local VLM."""

    def layout_client(self) -> OpenAICaptioner:
        """The chat client the samples' ``llm`` layouts ask for boxes (docs/design.md#layout-control): the same
        OpenAI-compatible endpoint, model and key as captioning."""
        if self.backend != "openai":
            raise CastloraError(
                f"A samples prompt asks for an 'llm' layout, but the captioner resource's backend is "
                f"{self.backend!r}: set it to 'openai' (with base_url for a local OpenAI-compatible server such as "
                "vLLM, Ollama or LM Studio), or use layout auto, boxes or sizes."
            )
        return self._openai()

    def _openai(self) -> OpenAICaptioner:
        from pipeline.captions.openai_backend import OpenAICaptioner, OpenAICaptionerConfig

        return OpenAICaptioner(
            OpenAICaptionerConfig(
                base_url=self.base_url or None,
                model=self.model or "gpt-4o-mini",
                api_key_env=self.api_key_env,
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
            )
        )

    def build(self, cache_root: Path, preset_vlm: str) -> Captioner:
        if self.backend == "template":
            from pipeline.captions.template import TemplateCaptioner

            return TemplateCaptioner(template=self.template)
        if self.backend == "openai":
            return self._openai()
        if self.backend == "transformers":
            from pipeline.captions.transformers_backend import TransformersCaptioner
            from pipeline.models.loading import resolve_model

            source = resolve_model(self.model or preset_vlm, cache_root, "captioning VLM")
            return TransformersCaptioner(source, device=self.device)
        raise CastloraError(f"CaptionerResource.backend {self.backend!r} is unknown; choose one of {BACKENDS}.")
