"""Layout control (docs/design.md#layout-control): per-prompt layouts parsed and refused by name, user boxes and
relative sizes reaching the layout, the auto layout unchanged, and LLM boxes asked of a local OpenAI-compatible
server (good answer used; bad answers retried, then auto with a warning). No model is loaded here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.captions.openai_backend import OpenAICaptioner, OpenAICaptionerConfig
from pipeline.errors import CastloraError, LayoutError
from pipeline.infer import layout_from_composite
from pipeline.layout_control import (
    LLM_SYSTEM,
    LayoutRequest,
    PairLayouts,
    PromptEntry,
    ask_llm_layout,
    parse_prompt_entries,
    pixel_box,
)
from pipeline.rendering import segmix_layout_factory
from pipeline.segmix.compose import SegMixConfig, SegMixSubject, compose
from pipeline.stages.segmix_bank import BankConfig, run_segmix_bank
from pipeline.storage.hashing import sha256_file
from pipeline.storage.lineage import LineageRecorder
from resources import CaptionerResource
from tests.servers.openai_api import start_chat_server

IDS = ["dog6", "dog2"]
SIDE = 128
GOOD_BOXES = {"dog6": [0.05, 0.1, 0.45, 0.9], "dog2": [0.55, 0.5, 0.95, 0.9]}


def block(colour: tuple[int, int, int], width: int, height: int) -> Image.Image:
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[...] = (*colour, 255)
    return Image.fromarray(rgba)


def cast() -> dict[str, list[SegMixSubject]]:
    """Two cut-outs per character, solid blocks (so a box's pixels are exactly where the subject landed)."""
    return {
        "dog6": [SegMixSubject(block((220, 30, 30), 40 + 4 * i, 60), "olis dog", "dog6", f"a{i}") for i in range(2)],
        "dog2": [SegMixSubject(block((30, 40, 210), 50, 40 + 4 * i), "vrin dog", "dog2", f"b{i}") for i in range(2)],
    }


def layouts(**kwargs) -> PairLayouts:
    return PairLayouts(cast(), (SIDE, SIDE), **kwargs)


def heights(layout) -> dict[str, int]:
    return {label: box[3] - box[1] for label, box in zip(layout.labels, layout.boxes, strict=True)}


# --- parsing and refusals ------------------------------------------------------------------------------------


def test_prompt_entries_accept_text_and_every_layout_mode():
    raw = [
        "plain text prompt",
        {"prompt": "boxes prompt", "layout": {"mode": "boxes", "boxes": GOOD_BOXES}},
        {"prompt": "sizes prompt", "layout": {"sizes": {"dog6": 2, "dog2": 1}}},  # mode inferred
        {"prompt": "llm prompt", "layout": "llm"},
        {"prompt": "auto prompt", "layout": {"mode": "auto"}},
    ]
    entries = parse_prompt_entries(raw, IDS)
    assert [e.layout.mode for e in entries] == ["auto", "boxes", "sizes", "llm", "auto"]
    assert entries[0] == PromptEntry("plain text prompt")
    assert entries[1].layout.boxes["dog2"] == (0.55, 0.5, 0.95, 0.9)
    assert entries[2].layout.sizes == {"dog6": 2.0, "dog2": 1.0}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"mode": "boxes", "boxes": {**GOOD_BOXES, "dog2": [0.5, 0.5, 1.2, 0.9]}}, r"box of 'dog2' \[0\.5, 0\.5, 1\.2"),
        ({"mode": "boxes", "boxes": {**GOOD_BOXES, "dog6": [0.6, 0.1, 0.4, 0.9]}}, r"box of 'dog6' \[0\.6, 0\.1, 0\.4"),
        ({"mode": "boxes", "boxes": {**GOOD_BOXES, "dog6": [-0.1, 0, 0.4, 0.9]}}, "outside the canvas"),
        ({"mode": "boxes", "boxes": {**GOOD_BOXES, "dog6": [0.1, 0.2, 0.3]}}, r"box of 'dog6' \[0\.1, 0\.2, 0\.3\]"),
        (
            {"mode": "boxes", "boxes": {"dog6": GOOD_BOXES["dog6"]}},
            r"exactly one entry per character.*missing \['dog2'\]",
        ),
        ({"mode": "boxes", "boxes": {**GOOD_BOXES, "cat": [0, 0, 1, 1]}}, r"unknown character\(s\) \['cat'\]"),
        (
            {"mode": "boxes", "boxes": [{"dog6": [0, 0, 0.5, 1]}, {"dog6": [0.5, 0, 1, 1]}]},
            r"'dog6' is named twice in 'boxes' \(box \[0\.5, 0, 1, 1\]\)",
        ),
        ({"mode": "boxes", "boxes": [0, 0, 1, 1]}, r"'boxes' must map each character id \(dog6, dog2\) to its box"),
        ({"mode": "sizes", "sizes": {"dog6": 0, "dog2": 1}}, "size of 'dog6' is 0; relative sizes must be > 0"),
        ({"mode": "teleport"}, "layout mode 'teleport' is unknown"),
        ({"mode": "auto", "boxes": GOOD_BOXES}, "layout mode 'auto' takes no 'boxes'"),
        ({"mode": "boxes", "box": GOOD_BOXES}, r"unknown layout field\(s\) \['box'\]"),
    ],
)
def test_invalid_layouts_are_refused_naming_the_prompt_and_box(layout, message):
    raw = ["a fine prompt", {"prompt": "olis dog on vrin dog", "layout": layout}]
    with pytest.raises(LayoutError, match=message) as info:
        parse_prompt_entries(raw, IDS)
    assert "samples prompt 2 ('olis dog on vrin dog')" in str(info.value)


def test_a_prompt_entry_needs_its_text_and_known_fields():
    with pytest.raises(LayoutError, match=r"samples prompt 1: 'prompt' must be non-empty text"):
        parse_prompt_entries([{"layout": "llm"}], IDS)
    with pytest.raises(LayoutError, match=r"samples prompt 1: unknown field\(s\) \['layuot'\]"):
        parse_prompt_entries([{"prompt": "x", "layuot": "llm"}], IDS)


# --- layouts from the pair's cut-outs ------------------------------------------------------------------------


def test_user_boxes_put_each_character_and_the_union_mask_inside_its_box():
    request = parse_prompt_entries([{"prompt": "p", "layout": {"boxes": GOOD_BOXES}}], IDS)[0].layout
    for seed in (0, 1):
        layout = layouts().factory(request)(seed)
        assert layout.origin == "user" and layout.labels == ("dog6", "dog2")
        outside = np.ones((SIDE, SIDE), dtype=bool)
        for cid, placed in zip(layout.labels, layout.boxes, strict=True):
            x0, y0, x1, y1 = pixel_box(request.boxes[cid], (SIDE, SIDE))
            assert x0 <= placed[0] < placed[2] <= x1 and y0 <= placed[1] < placed[3] <= y1
            outside[y0:y1, x0:x1] = False
        assert layout.union_mask.any() and not (layout.union_mask & outside).any()
        # The red character fills part of its own box, the blue one part of its own.
        pixels = np.asarray(layout.image)
        assert (pixels[layout.boxes[0][1] + 2, layout.boxes[0][0] + 2] == (220, 30, 30)).all()
        assert (pixels[layout.boxes[1][1] + 2, layout.boxes[1][0] + 2] == (30, 40, 210)).all()


@pytest.mark.parametrize("sizes", [{"dog6": 2.0, "dog2": 1.0}, {"dog6": 1.0, "dog2": 1.5}])
def test_relative_sizes_hold_in_the_sampled_layout(sizes):
    request = LayoutRequest("sizes", sizes=sizes)
    factory = layouts().factory(request)
    for seed in range(4):
        layout = factory(seed)
        got = heights(layout)
        assert layout.origin == "user"
        assert got["dog6"] / got["dog2"] == pytest.approx(sizes["dog6"] / sizes["dog2"], abs=0.06)


def test_auto_layout_is_todays_seg_mix_layout():
    subjects = cast()
    segments_like = PairLayouts(subjects, (SIDE, SIDE), seed_offset=3)
    assert segments_like.factory(LayoutRequest()) is None  # auto prompts share the seed's default layout
    for seed in (0, 5):
        chosen = [group[(seed + 3) % len(group)] for group in subjects.values()]
        before = layout_from_composite(compose(chosen, SegMixConfig(canvas=(SIDE, SIDE), k=2), seed + 3))
        now = segments_like.segmix(seed)
        assert now.image.tobytes() == before.image.tobytes() and now.boxes == before.boxes
        assert now.source == f"segmix:{seed + 3}" and now.origin == "auto" and now.labels == ("dog6", "dog2")


def test_spec_relative_sizes_reach_the_auto_layout_and_the_bank(tmp_path: Path):
    auto = layouts(relative_sizes={"dog6": 2.0, "dog2": 1.0})
    for seed in range(3):
        got = heights(auto.segmix(seed))
        assert got["dog6"] / got["dog2"] == pytest.approx(2.0, abs=0.06)

    rows = []
    for cid, group in cast().items():
        for n, subject in enumerate(group):
            path = tmp_path / f"{cid}_{n}.png"
            subject.image.save(path)
            rows.append(
                {
                    "status": "ok",
                    "character_id": cid,
                    "cutout_path": str(path),
                    "token_phrase": subject.phrase,
                    "cutout_sha256": sha256_file(path),
                }
            )
    segments = pd.DataFrame(rows)
    factory = segmix_layout_factory(segments, SIDE, relative_sizes={"dog6": 1.0, "dog2": 1.5})
    got = heights(factory(0))
    assert got["dog2"] / got["dog6"] == pytest.approx(1.5, abs=0.06)

    recorder = LineageRecorder(tmp_path / "lineage", "run", "segmix_bank", "dog6__dog2", "1")
    out = run_segmix_bank(
        segments=segments,
        class_images=None,
        character_nouns={"dog6": "dog", "dog2": "dog"},
        out_dir=tmp_path / "bank",
        config=BankConfig(n_instance=4, n_prior=0, segmix=SegMixConfig(canvas=(SIDE, SIDE))),
        recorder=recorder,
        relative_sizes={"dog6": 2.0, "dog2": 1.0},
    )
    for row in out.manifest.to_dict("records"):
        boxes = dict(zip(row["character_ids"], json.loads(row["boxes_json"]), strict=True))
        ratio = (boxes["dog6"][3] - boxes["dog6"][1]) / (boxes["dog2"][3] - boxes["dog2"][1])
        assert ratio == pytest.approx(2.0, abs=0.06)
    assert json.loads((tmp_path / "bank" / "config.json").read_text())["segmix"]["relative_scale"] == {
        "dog6": 2.0,
        "dog2": 1.0,
    }


# --- LLM-guided layouts against the local OpenAI-compatible server -------------------------------------------


def client(url: str) -> OpenAICaptioner:
    return OpenAICaptioner(OpenAICaptionerConfig(base_url=url, model="test-model", max_retries=0, timeout_s=10))


PHRASES = {"dog6": "olis dog", "dog2": "vrin dog"}


def test_a_good_llm_answer_is_used_and_the_request_names_prompt_and_characters():
    answer = "```json\n" + json.dumps({"boxes": GOOD_BOXES}) + "\n```"
    with start_chat_server(replies=[answer]) as chat:
        result = ask_llm_layout(client(chat.url), "olis dog sitting on vrin dog", PHRASES, (SIDE, SIDE), retries=2)
    assert result.boxes == {k: tuple(v) for k, v in GOOD_BOXES.items()} and result.attempts == 1
    assert not result.warning and len(chat.requests) == 1
    messages = chat.requests[0]["messages"]
    assert messages[0] == {"role": "system", "content": LLM_SYSTEM}
    assert "olis dog sitting on vrin dog" in messages[1]["content"] and "dog6: olis dog" in messages[1]["content"]
    assert chat.requests[0]["temperature"] == 0.0
    layout = layouts().factory(LayoutRequest("llm"), result)(0)
    assert layout.origin == "llm" and layout.source == "llm" and not layout.warning


def test_a_bad_llm_answer_is_retried_with_the_reason():
    bad = json.dumps({"boxes": {"dog6": [0.1, 0.1, 0.5, 0.9]}})  # dog2 missing
    with start_chat_server(replies=[bad, json.dumps({"boxes": GOOD_BOXES})]) as chat:
        result = ask_llm_layout(client(chat.url), "a prompt", PHRASES, (SIDE, SIDE), retries=2)
    assert result.boxes is not None and result.attempts == 2 and len(chat.requests) == 2
    assert "previous answer was rejected" in chat.requests[1]["messages"][1]["content"]
    assert "missing ['dog2']" in chat.requests[1]["messages"][1]["content"]


@pytest.mark.parametrize(
    "bad",
    [
        "Sure! Here are your boxes.",
        json.dumps({"boxes": {"dog6": [0.1, 0.1, 0.5, 0.9], "dog2": [0.5, 0.1, 1.5, 0.9]}}),
        '{"boxes": {"dog6": [0, 0, 0.5, 1], "dog6": [0.5, 0, 1, 1]}}',
        json.dumps({"layout": GOOD_BOXES}),
    ],
    ids=["prose", "off-canvas", "named-twice", "wrong-shape"],
)
def test_bad_llm_answers_are_retried_then_fall_back_to_auto_with_a_warning(bad):
    with start_chat_server(replies=[bad] * 3) as chat:
        result = ask_llm_layout(client(chat.url), "a prompt", PHRASES, (SIDE, SIDE), retries=2, what="prompt 1")
    assert result.boxes is None and result.attempts == 3 and len(chat.requests) == 3
    assert "no valid LLM layout after 3 attempt(s)" in result.warning and "auto" in result.warning
    pair = layouts()
    fallback = pair.factory(LayoutRequest("llm"), result)(4)
    auto = pair.segmix(4)
    assert fallback.origin == "auto" and fallback.warning == result.warning
    assert fallback.image.tobytes() == auto.image.tobytes()


def test_an_unreachable_llm_falls_back_after_its_retries():
    with start_chat_server() as chat:
        url = chat.url
    result = ask_llm_layout(client(url), "a prompt", PHRASES, (SIDE, SIDE), retries=1)
    assert result.boxes is None and result.attempts == 2 and "could not connect" in result.warning


def test_llm_layouts_need_the_openai_captioner_backend():
    with pytest.raises(CastloraError, match="backend is 'template': set it to 'openai'"):
        CaptionerResource(backend="template").layout_client()
    assert isinstance(
        CaptionerResource(backend="openai", base_url="http://127.0.0.1:9/v1").layout_client(), OpenAICaptioner
    )
