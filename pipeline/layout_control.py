"""Layout control at inference (MuDI §5.4, Fig. 24; docs/design.md#layout-control).

MuDI's init starts from the encoded picture of who stands where (``pipeline.infer``). This module decides that
picture per prompt:

- ``auto``: today's random Seg-Mix layout, drawn from the image's seed (the pair spec's relative sizes apply);
- ``boxes``: the user's boxes, fractions of the canvas ``[x0, y0, x1, y1]`` per character id;
- ``sizes``: relative heights per character id only; Seg-Mix draws the places with those sizes;
- ``llm``: an OpenAI-compatible chat model is asked for boxes for the prompt; its answer is validated as strictly
  as a user's, a bad one is asked again (``retries`` times) and then the prompt falls back to ``auto`` with a
  warning that every image of the prompt records.

Every prompt entry is checked before any rendering, and every error names the prompt and the box or field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.errors import CastloraError, LayoutError
from pipeline.infer import Layout, layout_from_boxes, layout_from_composite
from pipeline.segmix.compose import SegMixConfig, SegMixSubject, compose

MODES = ("auto", "boxes", "sizes", "llm")
ORIGIN_USER, ORIGIN_LLM, ORIGIN_AUTO = "user", "llm", "auto"
DEFAULT_LLM_RETRIES = 2
"""Asks after a bad LLM answer before falling back to ``auto``."""

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) as fractions of the canvas, origin top-left, x1 > x0 and y1 > y0."""

_ENTRY_FIELDS = ("prompt", "layout")
_LAYOUT_FIELDS = ("mode", "boxes", "sizes")


@dataclass(frozen=True)
class LayoutRequest:
    """What one prompt asks of its layout."""

    mode: str = "auto"
    boxes: Mapping[str, Box] = field(default_factory=dict)
    """``mode="boxes"``: one box per character id."""
    sizes: Mapping[str, float] = field(default_factory=dict)
    """``mode="sizes"``: relative height per character id (dog 2, toy 1: the dog twice the toy's height)."""

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "boxes": dict(self.boxes), "sizes": dict(self.sizes)}, sort_keys=True)


AUTO = LayoutRequest()


@dataclass(frozen=True)
class PromptEntry:
    prompt: str
    layout: LayoutRequest = AUTO


def _where(index: int, prompt: str | None) -> str:
    shown = f" ({prompt[:80]!r})" if prompt else ""
    return f"samples prompt {index + 1}{shown}"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LayoutError(f"{what}: expected a number, got {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise LayoutError(f"{what}: expected a finite number, got {value!r}.")
    return number


_SINGULAR = {"boxes": "box", "sizes": "relative size"}


def _check_names(mapping: Any, character_ids: Sequence[str], what: str, kind: str) -> None:
    """``mapping`` names each character exactly once (YAML keeps the last of two equal keys, so a character
    "named twice" reaches here as the same id under two spellings: caught by the count and unknown checks)."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise LayoutError(
            f"{what}: '{kind}' must map each character id ({', '.join(character_ids)}) to its {_SINGULAR[kind]}, "
            f"got {mapping!r}."
        )
    names = [str(k) for k in mapping]
    unknown = [n for n in names if n not in character_ids]
    if unknown:
        raise LayoutError(
            f"{what}: {kind} for unknown character(s) {unknown}; the pair's characters are {list(character_ids)}."
        )
    missing = [c for c in character_ids if c not in names]
    if missing or len(names) != len(character_ids):
        raise LayoutError(
            f"{what}: {kind} must give exactly one entry per character ({len(character_ids)}: "
            f"{list(character_ids)}); got {len(names)}" + (f", missing {missing}." if missing else ".")
        )


def check_boxes(boxes: Any, character_ids: Sequence[str], what: str) -> dict[str, Box]:
    """Validated boxes per character id: four finite fractions, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    if isinstance(boxes, Sequence) and not isinstance(boxes, str):
        # A list of {character: box} pairs is how a character gets named twice; refuse it by name.
        seen: list[str] = []
        flat: dict[str, Any] = {}
        for item in boxes:
            if not isinstance(item, Mapping):
                raise LayoutError(
                    f"{what}: 'boxes' must map each character id ({', '.join(character_ids)}) to its box, e.g. "
                    f"{{{character_ids[0]}: [x0, y0, x1, y1], ...}}; got {boxes!r}."
                )
            for name, box in item.items():
                if name in seen:
                    raise LayoutError(f"{what}: character {name!r} is named twice in 'boxes' (box {box!r}).")
                seen.append(name)
                flat[name] = box
        boxes = flat
    _check_names(boxes, character_ids, what, "boxes")
    checked: dict[str, Box] = {}
    for name in character_ids:
        raw = boxes[name]
        at = f"{what}: box of {name!r} {raw!r}"
        if isinstance(raw, str) or not isinstance(raw, Sequence) or len(raw) != 4:
            raise LayoutError(f"{at}: expected four numbers [x0, y0, x1, y1] (fractions of the canvas).")
        x0, y0, x1, y1 = (_number(v, at) for v in raw)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise LayoutError(
                f"{at}: must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the canvas, origin "
                "top-left); it lies outside the canvas or is empty."
            )
        checked[name] = (x0, y0, x1, y1)
    return checked


def check_sizes(sizes: Any, character_ids: Sequence[str], what: str) -> dict[str, float]:
    """Validated relative heights per character id: finite and > 0."""
    _check_names(sizes, character_ids, what, "sizes")
    checked = {}
    for name in character_ids:
        value = _number(sizes[name], f"{what}: size of {name!r}")
        if value <= 0:
            raise LayoutError(f"{what}: size of {name!r} is {sizes[name]!r}; relative sizes must be > 0.")
        checked[name] = value
    return checked


def parse_layout(raw: Any, character_ids: Sequence[str], what: str) -> LayoutRequest:
    """A prompt's ``layout``: ``auto``/``llm`` as text, or ``{mode, boxes | sizes}`` (mode may be left out when
    exactly one of boxes and sizes is given)."""
    if raw is None:
        return AUTO
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, Mapping):
        raise LayoutError(f"{what}: 'layout' must be auto, llm or a mapping with mode and boxes/sizes; got {raw!r}.")
    unknown = [k for k in raw if k not in _LAYOUT_FIELDS]
    if unknown:
        raise LayoutError(f"{what}: unknown layout field(s) {unknown}; known: {', '.join(_LAYOUT_FIELDS)}.")
    given = [k for k in ("boxes", "sizes") if raw.get(k) is not None]
    mode = raw.get("mode") or (given[0] if len(given) == 1 else "auto")
    if mode not in MODES:
        raise LayoutError(f"{what}: layout mode {mode!r} is unknown; choose one of {', '.join(MODES)}.")
    extra = [k for k in given if k != mode]
    if extra:
        raise LayoutError(f"{what}: layout mode {mode!r} takes no {extra[0]!r}; remove it or set mode: {extra[0]}.")
    if mode == "boxes":
        return LayoutRequest(mode, boxes=check_boxes(raw.get("boxes"), character_ids, what))
    if mode == "sizes":
        return LayoutRequest(mode, sizes=check_sizes(raw.get("sizes"), character_ids, what))
    return LayoutRequest(mode)


def parse_prompt_entries(raw: Sequence[Any], character_ids: Sequence[str]) -> list[PromptEntry]:
    """The samples launchpad's ``prompts``: each a prompt text (``auto`` layout) or ``{prompt, layout}``."""
    entries = []
    for index, item in enumerate(raw):
        if isinstance(item, str):
            text, layout = item, None
        elif isinstance(item, Mapping):
            unknown = [k for k in item if k not in _ENTRY_FIELDS]
            if unknown:
                raise LayoutError(
                    f"{_where(index, None)}: unknown field(s) {unknown}; a prompt entry has 'prompt' and 'layout'."
                )
            text, layout = item.get("prompt"), item.get("layout")
        else:
            raise LayoutError(f"{_where(index, None)}: expected a prompt text or {{prompt, layout}}, got {item!r}.")
        if not isinstance(text, str) or not text.strip():
            raise LayoutError(f"{_where(index, None)}: 'prompt' must be non-empty text, got {text!r}.")
        entries.append(PromptEntry(text, parse_layout(layout, character_ids, _where(index, text))))
    return entries


# --- LLM-guided layouts --------------------------------------------------------------------------------------


class TextCompleter(Protocol):
    """A chat model that answers one system + user message with text (``OpenAICaptioner.complete_text``)."""

    def complete_text(self, system: str, user: str) -> str: ...


LLM_SYSTEM = (
    "You place subjects on a canvas for an image generator. Answer with one JSON object and nothing else: "
    '{"boxes": {"<subject id>": [x0, y0, x1, y1], ...}} with one box per subject id given, coordinates as '
    "fractions of the canvas between 0 and 1, origin top-left, x0 < x1 and y0 < y1. Size and place each box so "
    "the arrangement fits the prompt (who is above, beside or on whom, and how big each subject is)."
)


def llm_user_message(prompt: str, subjects: Mapping[str, str], canvas: tuple[int, int]) -> str:
    described = "; ".join(f"{cid}: {phrase}" for cid, phrase in subjects.items())
    return f"Canvas: {canvas[0]}x{canvas[1]} pixels.\nPrompt: {prompt}\nSubjects (id: description): {described}"


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_llm_boxes(answer: str, character_ids: Sequence[str], what: str) -> dict[str, Box]:
    """The boxes of an LLM answer (a ```json fence is tolerated), checked like a user's boxes."""
    fenced = _FENCE.match(answer or "")
    text = fenced.group(1) if fenced else (answer or "").strip()
    try:
        data = json.loads(text, object_pairs_hook=_refuse_repeated_keys(what))
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{what}: the answer is not JSON ({exc.msg} at position {exc.pos}).") from None
    if not isinstance(data, dict) or set(data) != {"boxes"}:
        raise LayoutError(f'{what}: the answer must be one object {{"boxes": {{...}}}}, got {text[:200]!r}.')
    return check_boxes(data["boxes"], character_ids, what)


def _refuse_repeated_keys(what: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """json.loads keeps the last of two equal keys; a character named twice must be an error instead."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise LayoutError(f"{what}: character {key!r} is named twice in the answer (box {value!r}).")
            result[key] = value
        return result

    return build


@dataclass(frozen=True)
class LlmLayout:
    boxes: dict[str, Box] | None
    """None: every attempt failed and the prompt falls back to ``auto``."""
    attempts: int
    warning: str = ""


def ask_llm_layout(
    client: TextCompleter,
    prompt: str,
    subjects: Mapping[str, str],
    canvas: tuple[int, int],
    retries: int = DEFAULT_LLM_RETRIES,
    what: str = "llm layout",
) -> LlmLayout:
    """Boxes for ``prompt`` from ``client``; a bad answer (not JSON, wrong characters, a box off the canvas) or a
    failed request is asked again, telling the model what was wrong, up to ``retries`` times; then no boxes and a
    warning naming the last problem."""
    if retries < 0:
        raise CastloraError(f"llm_layout_retries must be >= 0, got {retries}.")
    character_ids = list(subjects)
    message = llm_user_message(prompt, subjects, canvas)
    problem = ""
    for attempt in range(1, retries + 2):
        asked = message if not problem else f"{message}\nYour previous answer was rejected: {problem}"
        try:
            answer = client.complete_text(LLM_SYSTEM, asked)
            return LlmLayout(parse_llm_boxes(answer, character_ids, what), attempt)
        except CastloraError as exc:  # a bad answer (LayoutError) or a failed request (CaptionError)
            problem = str(exc)
    warning = (
        f"{what}: no valid LLM layout after {retries + 1} attempt(s) (last problem: {problem[:300]}); "
        "the auto (random Seg-Mix) layout was used instead."
    )
    return LlmLayout(None, retries + 1, warning)


# --- Layouts from the pair's cut-outs ------------------------------------------------------------------------


def pixel_box(box: Box, canvas: tuple[int, int]) -> tuple[int, int, int, int]:
    """A fraction box in canvas pixels (x1, y1 exclusive), never empty: x0 rounds down, x1 up."""
    width, height = canvas
    x0, y0, x1, y1 = box
    left, top = min(math.floor(x0 * width), width - 1), min(math.floor(y0 * height), height - 1)
    return left, top, max(math.ceil(x1 * width), left + 1), max(math.ceil(y1 * height), top + 1)


@dataclass
class PairLayouts:
    """Layouts of the pair's cut-outs on a ``canvas``: seed s uses the (s + offset)-th cut-out of each character
    (cycling), so a seed shows the same characters' cut-outs under every mode."""

    subjects: Mapping[str, Sequence[SegMixSubject]]
    """Cut-outs per character id (``pipeline.segmix.subjects.instance_subjects``)."""
    canvas: tuple[int, int]
    seed_offset: int = 0
    relative_sizes: Mapping[str, float] | None = None
    """The pair spec's relative heights, used by ``auto``; None: independent sizes as in MuDI."""

    def __post_init__(self) -> None:
        if not self.subjects or not all(self.subjects.values()):
            raise CastloraError(
                "No usable cut-outs in the segments manifest: MuDI init needs a layout of the characters."
            )

    @property
    def character_ids(self) -> list[str]:
        return list(self.subjects)

    def _chosen(self, seed: int) -> list[SegMixSubject]:
        return [group[(seed + self.seed_offset) % len(group)] for group in self.subjects.values()]

    def segmix(self, seed: int, sizes: Mapping[str, float] | None = None, origin: str = ORIGIN_AUTO) -> Layout:
        """A Seg-Mix composite (``relative_scale`` = ``sizes``, else the spec's relative sizes)."""
        scale = dict(sizes) if sizes else (dict(self.relative_sizes) if self.relative_sizes else None)
        config = SegMixConfig(canvas=self.canvas, k=len(self.subjects), relative_scale=scale)
        composite = compose(self._chosen(seed), config, seed + self.seed_offset)
        return layout_from_composite(composite, self.character_ids, origin)

    def boxes(self, seed: int, boxes: Mapping[str, Box], origin: str = ORIGIN_USER) -> Layout:
        """The cut-outs fitted into the given boxes (``pipeline.infer.layout_from_boxes``)."""
        ids = self.character_ids
        return layout_from_boxes(
            [s.image for s in self._chosen(seed)],
            [pixel_box(boxes[cid], self.canvas) for cid in ids],
            self.canvas,
            labels=ids,
            origin=origin,
        )

    def factory(self, request: LayoutRequest, llm: LlmLayout | None = None) -> Callable[[int], Layout] | None:
        """The per-seed layout maker of a prompt; None for ``auto`` (the shared default layouts)."""
        if request.mode == "boxes":
            return lambda seed: self.boxes(seed, request.boxes)
        if request.mode == "sizes":
            return lambda seed: self.segmix(seed, request.sizes, ORIGIN_USER)
        if request.mode == "llm":
            if llm is None:
                raise CastloraError("An llm layout needs the LLM's answer (ask_llm_layout) before rendering.")
            if llm.boxes is not None:
                return lambda seed: self.boxes(seed, llm.boxes, ORIGIN_LLM)
            return lambda seed: _with_warning(self.segmix(seed), llm.warning)
        return None


def _with_warning(layout: Layout, warning: str) -> Layout:
    return Layout(
        image=layout.image,
        union_mask=layout.union_mask,
        boxes=layout.boxes,
        source=layout.source,
        labels=layout.labels,
        origin=layout.origin,
        warning=warning,
    )
