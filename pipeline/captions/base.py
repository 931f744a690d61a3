"""Caption contract shared by every backend: the instruction, the cache key and the token-phrase rewrite.

MuDI captions each reference photo with a comprehensive sentence instead of "a photo of [V]"; that
reduces background overfitting. Backends return the *raw* caption (it mentions the class noun); the
rare-token phrase is substituted afterwards, so the cache survives a change of token phrase.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from PIL import Image

from pipeline.storage.hashing import sha256_json

if TYPE_CHECKING:
    from pipeline.captions.cache import CaptionCache

log = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
"""Bump when CAPTION_INSTRUCTION changes: it is part of the cache key, so old captions are not reused."""

CAPTION_INSTRUCTION = (
    "Write one comprehensive sentence describing this photo of a {class_noun}: the {class_noun} itself "
    "(its appearance), its pose or action, and the background or setting. Refer to the subject as "
    '"the {class_noun}" or "a {class_noun}"; do not give it a name. Reply with the sentence only, '
    "no preamble, no quotes."
)

_CACHE_KEY_SCHEMA = "castlora-caption-1"
_PUNCTUATION = ".,;:!?)\"'"

# Irregular plurals of nouns likely to be a character's class noun; regular ones are handled by suffix.
_IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "mouse": "mice",
    "goose": "geese",
    "foot": "feet",
    "tooth": "teeth",
    "ox": "oxen",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
}


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns an image into one raw caption mentioning the class noun."""

    backend: str
    """"openai" | "transformers" | "template"."""
    model: str
    """Model id, directory or name ("" for the template backend); part of the cache key."""
    prompt_version: str

    def caption(self, image: Image.Image, class_noun: str) -> str: ...


@dataclass(frozen=True)
class CaptionResult:
    text: str
    """Caption with the token phrase substituted: what training uses."""
    raw: str
    """Caption as the backend produced it (what the cache stores)."""
    cached: bool
    cache_key: str


def instruction_for(class_noun: str) -> str:
    return CAPTION_INSTRUCTION.format(class_noun=class_noun.strip())


def clean_caption(text: str) -> str:
    """Normalise a model's reply to one line: drop wrapping quotes and collapse whitespace."""
    text = " ".join(text.split())
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def caption_key(image_sha256: str, captioner: Captioner, class_noun: str) -> str:
    """Cache key: the same image, backend, model, prompt version and class noun give the same caption."""
    return sha256_json(
        {
            "schema": _CACHE_KEY_SCHEMA,
            "image_sha256": image_sha256,
            "backend": captioner.backend,
            "model": captioner.model,
            "prompt_version": captioner.prompt_version,
            "class_noun": " ".join(class_noun.split()).lower(),
        }
    )


def caption_image(
    captioner: Captioner,
    cache: CaptionCache,
    image: Image.Image,
    image_sha256: str,
    class_noun: str,
    token_phrase: str,
) -> CaptionResult:
    """Caption one image through the cache, then substitute the token phrase."""
    key = caption_key(image_sha256, captioner, class_noun)
    raw = cache.get(key)
    cached = raw is not None
    if raw is None:
        raw = clean_caption(captioner.caption(image, class_noun))
        cache.put(
            key,
            raw,
            {
                "image_sha256": image_sha256,
                "backend": captioner.backend,
                "model": captioner.model,
                "prompt_version": captioner.prompt_version,
                "class_noun": class_noun,
            },
        )
        log.debug("captioned %s with %s:%s", image_sha256[:12], captioner.backend, captioner.model)
    return CaptionResult(text=apply_token_phrase(raw, class_noun, token_phrase), raw=raw, cached=cached, cache_key=key)


# --- token phrase substitution -------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.lower().split()


def _plural_forms(noun: str) -> list[str]:
    """Plural spellings of a (lower-case) head noun, most specific first."""
    if noun in _IRREGULAR_PLURALS:
        return [_IRREGULAR_PLURALS[noun]]
    forms = []
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        forms.append(noun[:-1] + "ies")
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        forms.append(noun + "es")
    forms.append(noun + "s")
    return forms


def _noun_pattern(noun_words: list[str]) -> re.Pattern[str]:
    """Word-bounded, case-insensitive match of a (multi-word) noun; the last word may be plural."""
    *modifiers, head = noun_words
    head_forms = "|".join(re.escape(f) for f in [*_plural_forms(head), head])
    parts = [re.escape(w) for w in modifiers] + [f"(?:{head_forms})"]
    return re.compile(r"(?<![\w-])" + r"[\s-]+".join(parts) + r"(?![\w-])", re.IGNORECASE)


def _contains_phrase(caption: str, phrase: str) -> bool:
    words = phrase.split()
    pattern = r"(?<![\w-])" + r"\s+".join(re.escape(w) for w in words) + r"(?![\w-])"
    return re.search(pattern, caption, re.IGNORECASE) is not None


def _split_token_phrase(token_words: list[str], noun_words: list[str]) -> tuple[list[str], list[str]]:
    """Words of the token phrase before and after its own copy of the class noun."""
    n = len(noun_words)
    for i in range(len(token_words) - n, -1, -1):
        if token_words[i : i + n] == noun_words:
            return token_words[:i], token_words[i + n :]
    return token_words, []


def _drop_repeats(before: str, after: str, lead: list[str], trail: list[str]) -> tuple[str, str]:
    """Drop caption words next to the match that the token phrase already supplies.

    Without this, class noun "toy" with token "olis toy robot" turns "a toy robot" into
    "a olis toy robot robot".
    """
    before_words = before.split()
    for k in range(min(len(lead), len(before_words)), 0, -1):
        if [w.lower() for w in before_words[-k:]] == lead[-k:]:
            before = " ".join(before_words[:-k]) + (" " if len(before_words) > k else "")
            break
    after_words = after.split() if after.startswith(" ") else []
    for k in range(min(len(trail), len(after_words)), 0, -1):
        if [w.lower().rstrip(_PUNCTUATION) for w in after_words[:k]] == trail[:k]:
            last = after_words[k - 1]
            punctuation = last[len(last.rstrip(_PUNCTUATION)) :]
            rest = " ".join(after_words[k:])
            after = punctuation + (" " + rest if rest else "")
            break
    return before, after


def apply_token_phrase(caption: str, class_noun: str, token_phrase: str) -> str:
    """Replace the first mention of ``class_noun`` in ``caption`` with ``token_phrase``.

    "a dog on grass" -> "a olis dog on grass" (token phrase "olis dog"). Plural mentions become the
    singular token phrase (the token names one subject). A multi-word class noun that is not found whole
    falls back to its head noun ("a robot" for "toy robot"). With no mention at all the caption is
    prefixed with "a photo of <token phrase>, ". Idempotent: a caption already holding the phrase is
    returned unchanged.
    """
    caption = " ".join(caption.split())
    token_phrase = " ".join(token_phrase.split())
    noun_words = _words(class_noun)
    if not token_phrase or not noun_words:
        return caption
    if not caption:
        return f"a photo of {token_phrase}"
    if _contains_phrase(caption, token_phrase):
        return caption

    match = _noun_pattern(noun_words).search(caption)
    if match is None and len(noun_words) > 1:
        match = _noun_pattern(noun_words[-1:]).search(caption)
    if match is None:
        return f"a photo of {token_phrase}, {caption}"

    lead, trail = _split_token_phrase(_words(token_phrase), noun_words)
    before, after = _drop_repeats(caption[: match.start()], caption[match.end() :], lead, trail)
    return before + token_phrase + after
