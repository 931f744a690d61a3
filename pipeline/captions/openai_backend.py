"""Captions from any OpenAI-compatible chat-completions endpoint with image input.

Works with the OpenAI API (GPT-4o family) and local servers speaking the same protocol (vLLM, Ollama,
LM Studio). Retries are done here rather than by the client, so the policy (what is retried, how long
to wait) is explicit and tested. The API key never appears in an error message or a log line.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import openai
from PIL import Image

from pipeline.captions.base import PROMPT_VERSION, clean_caption, instruction_for
from pipeline.errors import CaptionError
from pipeline.images import to_rgb
from pipeline.redact import without_credentials

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 768
"""Longest side sent to the API: enough for a caption, and keeps requests small and cheap."""

LOCAL_PLACEHOLDER_KEY = "not-needed"
"""Sent when a custom base_url is set and no key is: local servers accept any key."""

_RETRYABLE_STATUS = frozenset({408, 429})
_MAX_RETRY_AFTER_S = 60.0
_BODY_EXCERPT_CHARS = 300


@dataclass
class OpenAICaptionerConfig:
    base_url: str | None = None
    """e.g. http://localhost:8000/v1 for vLLM; None for the OpenAI API (or OPENAI_BASE_URL)."""
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself is never stored in config)."""
    timeout_s: float = 60
    max_retries: int = 4
    """Retries after the first attempt, for timeouts, connection errors, 408, 429 and 5xx."""
    backoff_s: float = 1.0
    """First retry delay; doubles on each retry, plus up to 50% random jitter."""
    max_tokens: int = 120
    temperature: float | None = 0.0
    """0 keeps captions as repeatable as the endpoint allows; None omits it (for models that reject it)."""


def encode_image_data_url(image: Image.Image, max_side: int = MAX_IMAGE_SIDE) -> str:
    """JPEG data URL of ``image`` downscaled (aspect kept) so its longest side is at most ``max_side``."""
    rgb = to_rgb(image)
    if max(rgb.size) > max_side:
        rgb = rgb.copy()
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Redactor:
    """Scrubs the API key, recognisable fragments of it and key-like tokens from text."""

    _KEY_LIKE = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_*.\-]{4,}")

    def __init__(self, secret: str) -> None:
        self.secret = secret
        # Servers often echo a masked key ("sk-...abcd"): fragments of 4+ characters give the key away.
        self.fragments = [secret[-4:], secret[:8]] if len(secret) >= 12 else []

    def __call__(self, text: str) -> str:
        if self.secret and self.secret != LOCAL_PLACEHOLDER_KEY:
            text = text.replace(self.secret, "[redacted]")
            for fragment in self.fragments:
                text = re.sub(r"\S*" + re.escape(fragment) + r"\S*", "[redacted]", text)
        return self._KEY_LIKE.sub("[redacted]", without_credentials(text))


class OpenAICaptioner:
    backend = "openai"

    def __init__(self, config: OpenAICaptionerConfig | None = None) -> None:
        self.config = config or OpenAICaptionerConfig()
        self.model = self.config.model
        self.prompt_version = PROMPT_VERSION
        self._client: openai.OpenAI | None = None
        self._redact = _Redactor("")

    # --- setup -----------------------------------------------------------------------------------------

    def _api_key(self) -> str:
        key = os.environ.get(self.config.api_key_env, "").strip()
        if key:
            return key
        if self.config.base_url:
            return LOCAL_PLACEHOLDER_KEY
        raise CaptionError(
            f"Captioning with the OpenAI backend needs an API key: set the environment variable "
            f"{self.config.api_key_env} (or point base_url at a local OpenAI-compatible server such as "
            "vLLM, Ollama or LM Studio, or use the 'template' caption backend)."
        )

    def _get_client(self) -> openai.OpenAI:
        if self._client is None:
            base_url = self.config.base_url
            if base_url is not None and not base_url.startswith(("http://", "https://")):
                raise CaptionError(
                    f"Caption backend base_url {without_credentials(base_url)!r} must start with http:// or "
                    "https:// (e.g. http://localhost:8000/v1)."
                )
            key = self._api_key()
            self._redact = _Redactor(key)
            self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=self.config.timeout_s, max_retries=0)
        return self._client

    @property
    def shown_base_url(self) -> str:
        """base_url for messages: the configured one, else what the client resolved (OPENAI_BASE_URL)."""
        base = self.config.base_url or (str(self._client.base_url) if self._client else "")
        return without_credentials(base) if base else "(OpenAI default)"

    @property
    def endpoint(self) -> str:
        """Chat-completions URL, for messages (credentials stripped)."""
        base = str(self._client.base_url) if self._client else (self.config.base_url or "")
        return without_credentials(base.rstrip("/") + "/chat/completions")

    # --- captioning ------------------------------------------------------------------------------------

    def caption(self, image: Image.Image, class_noun: str) -> str:
        client = self._get_client()
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": instruction_for(class_noun)},
                    {"type": "image_url", "image_url": {"url": encode_image_data_url(image)}},
                ],
            }
        ]
        request: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.temperature is not None:
            request["temperature"] = self.config.temperature
        completion = self._call_with_retries(lambda: client.chat.completions.create(**request))
        return self._caption_from(completion)

    def complete_text(self, system: str, user: str, max_tokens: int = 400) -> str:
        """One text-only chat completion (the LLM-guided layouts of docs/design.md#layout-control use it); the
        same client, key handling and retries as captions."""
        client = self._get_client()
        request: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens,
        }
        if self.config.temperature is not None:
            request["temperature"] = self.config.temperature
        completion = self._call_with_retries(lambda: client.chat.completions.create(**request))
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            content = None
        if not isinstance(content, str) or not content.strip():
            raise CaptionError(f"Chat request to {self.endpoint} (model {self.config.model!r}) returned no text.")
        return content

    def _call_with_retries(self, call: Any) -> Any:
        attempts = 1 + max(0, self.config.max_retries)
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except openai.APIStatusError as exc:
                if not self._is_retryable_status(exc.status_code) or attempt == attempts:
                    raise self._status_error(exc, attempt) from None
                delay = self._delay(attempt, exc)
                reason = f"HTTP {exc.status_code}"
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                if attempt == attempts:
                    raise self._connection_error(exc, attempt) from None
                delay = self._delay(attempt, None)
                reason = "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
            except openai.OpenAIError as exc:
                raise CaptionError(
                    f"Caption request to {self.endpoint} failed: {type(exc).__name__}: "
                    f"{self._redact(str(exc))[:_BODY_EXCERPT_CHARS]}"
                ) from None
            log.warning(
                "Caption request to %s %s (attempt %d/%d); retrying in %.2f s.",
                self.endpoint,
                reason,
                attempt,
                attempts,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop always returns or raises

    @staticmethod
    def _is_retryable_status(status: int) -> bool:
        return status in _RETRYABLE_STATUS or status >= 500

    def _delay(self, attempt: int, exc: openai.APIStatusError | None) -> float:
        delay = self.config.backoff_s * 2 ** (attempt - 1)
        delay *= 1 + random.uniform(0, 0.5)  # jitter: parallel workers do not retry in lockstep
        retry_after = exc.response.headers.get("retry-after") if exc is not None else None
        if retry_after:
            # An HTTP-date Retry-After is ignored: the exponential delay is good enough.
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), _MAX_RETRY_AFTER_S))
        return delay

    def _status_error(self, exc: openai.APIStatusError, attempts: int) -> CaptionError:
        status = exc.status_code
        where = f"Caption request to {self.endpoint} (model {self.config.model!r}) failed with HTTP {status}"
        server_hint = (
            f" and that base_url {self.shown_base_url} is the server you meant" if self.config.base_url else ""
        )
        if status == 401:
            # The server's message often quotes part of the key, so it is not repeated here.
            return CaptionError(
                f"{where}: the API key was rejected; check the key in the environment variable "
                f"{self.config.api_key_env}{server_hint}."
            )
        if status == 403:
            return CaptionError(
                f"{where}: access denied; check that the key in the environment variable "
                f"{self.config.api_key_env} may use model {self.config.model!r}{server_hint}."
            )
        detail = self._server_detail(exc)
        if status == 404:
            hint = (
                f"check the model name {self.config.model!r} and base_url "
                f"{self.shown_base_url} (it usually ends in /v1)"
            )
        elif status == 400:
            hint = f"check that model {self.config.model!r} accepts image input"
        elif self._is_retryable_status(status):
            hint = f"gave up after {attempts} attempt(s); the server is overloaded or failing, try again later"
        else:
            hint = "check base_url and model"
        return CaptionError(f"{where}: {detail}; {hint}.")

    def _connection_error(self, exc: openai.APIConnectionError, attempts: int) -> CaptionError:
        what = (
            f"timed out after {self.config.timeout_s} s"
            if isinstance(exc, openai.APITimeoutError)
            else "could not connect"
        )
        return CaptionError(
            f"Caption request to {self.endpoint} {what} ({attempts} attempt(s)). Check that the server at "
            f"base_url {self.shown_base_url} is running and reachable"
            + (", or raise timeout_s" if isinstance(exc, openai.APITimeoutError) else "")
            + "."
        )

    def _server_detail(self, exc: openai.APIStatusError) -> str:
        body = exc.body
        if isinstance(body, dict):
            error = body.get("error", body)
            message = error.get("message") if isinstance(error, dict) else error
            text = str(message) if message else str(body)
        else:
            text = str(body) if body else "no details in the response"
        return "server said: " + self._redact(" ".join(text.split()))[:_BODY_EXCERPT_CHARS]

    def _caption_from(self, completion: Any) -> str:
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            content = None
        if not isinstance(content, str) or not clean_caption(content):
            raise CaptionError(
                f"Caption request to {self.endpoint} (model {self.config.model!r}) returned no caption text. "
                "Check that the model supports image input and that max_tokens is large enough."
            )
        return clean_caption(content)
