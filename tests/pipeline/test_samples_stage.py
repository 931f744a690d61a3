"""The samples stage: images, manifest and lineage for every (prompt, seed), with Seg-Mix layouts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from pipeline.captions.openai_backend import OpenAICaptioner, OpenAICaptionerConfig
from pipeline.errors import CastloraError, LayoutError
from pipeline.evaluation.draw import subject_colour
from pipeline.images import save_png
from pipeline.infer import DEFAULT_NEGATIVE, Layout, layout_from_composite
from pipeline.layout_control import PairLayouts, parse_prompt_entries, pixel_box
from pipeline.lora.adapters import LoraSpec, add_unet_lora, unet_lora_state_dict
from pipeline.lora.export import save_diffusers_lora
from pipeline.lora.record import LoraRecord
from pipeline.models.tiny_sdxl import build_tiny_sdxl
from pipeline.rendering import RenderSettings, layout_grid, render_samples
from pipeline.segmix.compose import SegMixConfig, SegMixSubject, compose
from pipeline.stages.samples import run_samples
from pipeline.storage.hashing import sha256_file
from pipeline.storage.lineage import LineageRecorder, ancestors, read_lineage
from tests.servers.openai_api import start_chat_server

SIDE = 64
LORA_SHA = "ab" * 32
PROMPTS = ["olis dog and vrin dog in a park", "olis dog and vrin dog on a sofa"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionXLPipeline:
    folder = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl(folder)
    loaded = StableDiffusionXLPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def block_cutout(colour: tuple[int, int, int], width: int, height: int) -> Image.Image:
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[...] = (*colour, 255)
    return Image.fromarray(rgba)


class SegMixLayouts:
    """The caller's layout factory: a fresh Seg-Mix composite per seed; counts its calls."""

    def __init__(self) -> None:
        self.subjects = [
            SegMixSubject(block_cutout((220, 30, 30), 40, 60), "olis dog", "dog6"),
            SegMixSubject(block_cutout((30, 40, 210), 50, 40), "vrin dog", "dog2"),
        ]
        self.config = SegMixConfig(canvas=(SIDE, SIDE), max_occlusion=1.0)
        self.calls: list[int] = []

    def __call__(self, seed: int) -> Layout:
        self.calls.append(seed)
        return layout_from_composite(compose(self.subjects, self.config, seed))


def recorder(root: Path, run_id: str) -> LineageRecorder:
    return LineageRecorder(root=root, run_id=run_id, asset_key="samples", partition_key="dog6__dog2", code_version="1")


def run(pipe: StableDiffusionXLPipeline, out_dir: Path, rec: LineageRecorder, **overrides) -> pd.DataFrame:
    kwargs = dict(
        prompts=PROMPTS,
        seeds=[5, 9, 13],
        images_per_prompt=2,
        layout_factory=SegMixLayouts(),
        gamma=1.0,
        lora_version="v0001",
        out_dir=out_dir,
        recorder=rec,
        settings=RenderSettings(height=SIDE, width=SIDE, steps=2, guidance_scale=5.0, negative_prompt=DEFAULT_NEGATIVE),
        lora_sha256=LORA_SHA,
        model_ids=["tiny:sdxl"],
    )
    kwargs.update(overrides)
    return render_samples(pipe=pipe, **kwargs)


def test_every_image_carries_prompt_seed_gamma_layout_and_lora(pipe, tmp_path: Path) -> None:
    layouts = SegMixLayouts()
    rec = recorder(tmp_path / "lineage", "run1")
    manifest = run(pipe, tmp_path / "samples", rec, layout_factory=layouts)
    rec.flush()

    assert len(manifest) == len(PROMPTS) * 2
    assert sorted(layouts.calls) == [5, 9]  # one layout per seed, shared by the prompts, seeds[:2] only
    assert set(zip(manifest["prompt"], manifest["seed"], strict=True)) == {(p, s) for p in PROMPTS for s in (5, 9)}
    assert (manifest["gamma"] == 1.0).all() and (manifest["lora_version"] == "v0001").all()
    assert (manifest["negative_prompt"] == DEFAULT_NEGATIVE).all() and (manifest["lora_sha256"] == LORA_SHA).all()
    for row in manifest.to_dict("records"):
        assert Path(row["path"]).is_file() and sha256_file(row["path"]) == row["sha256"]
        with Image.open(row["path"]) as image:
            assert image.size == (SIDE, SIDE)
        assert row["layout_source"] == f"segmix:{row['seed']}"
        boxes = json.loads(row["layout_boxes_json"])
        assert len(boxes) == 2 and all(len(box) == 4 for box in boxes)
        assert sha256_file(row["layout_path"]) == row["layout_sha256"] and Path(row["layout_mask_path"]).is_file()
    # Same seed, same layout under every prompt; different seeds, different Seg-Mix draws.
    per_seed = manifest.groupby("seed")["layout_sha256"].nunique()
    assert (per_seed == 1).all() and manifest["layout_sha256"].nunique() == 2

    lineage = read_lineage(tmp_path / "lineage").to_pylist()
    by_sha = {row["artifact_sha256"]: row for row in lineage}
    for row in manifest.to_dict("records"):
        entry = by_sha[row["sha256"]]
        assert entry["artifact_uri"] == row["path"] and entry["model_ids"] == ["tiny:sdxl"]
        assert entry["parent_sha256s"] == [row["layout_sha256"], LORA_SHA]
        params = json.loads(entry["params_json"])
        assert (params["prompt"], params["seed"], params["gamma"]) == (row["prompt"], row["seed"], 1.0)
        assert params["lora_version"] == "v0001" and params["layout_source"] == row["layout_source"]
    layout_row = ancestors(read_lineage(tmp_path / "lineage"), manifest["sha256"][0])[0]
    assert json.loads(layout_row["params_json"])["source"].startswith("segmix:")


def test_plain_noise_needs_no_layout_and_reruns_are_identical(pipe, tmp_path: Path) -> None:
    out_dir = tmp_path / "samples"
    first = run(pipe, out_dir, recorder(tmp_path / "lineage", "a"), gamma=None, layout_factory=None, lora_sha256=None)
    assert first["layout_source"].isna().all() and first["gamma"].isna().all()
    assert not (out_dir / "layouts").exists()
    rec = recorder(tmp_path / "lineage", "b")
    second = run(pipe, out_dir, rec, gamma=None, layout_factory=None, lora_sha256=None, images_per_prompt=1)
    assert set(second["sha256"]) < set(first["sha256"])  # seed 5 again: same pixels, same hash
    assert all(entry["parent_sha256s"] == [] for entry in rec.rows)
    # Files of the earlier, larger run that the new manifest no longer lists are gone.
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == ["p000_s5.png", "p001_s5.png"]


def test_invalid_settings_are_refused(pipe, tmp_path: Path) -> None:
    rec = recorder(tmp_path / "lineage", "c")
    with pytest.raises(CastloraError, match="layout_factory"):
        run(pipe, tmp_path, rec, layout_factory=None)
    with pytest.raises(CastloraError, match="seed"):
        run(pipe, tmp_path, rec, images_per_prompt=4)
    with pytest.raises(CastloraError, match="prompts"):
        run(pipe, tmp_path, rec, prompts=[])
    assert rec.rows == []


def test_per_prompt_counts_render_exactly_that_many(pipe, tmp_path: Path) -> None:
    rec = recorder(tmp_path / "lineage", "d")
    manifest = run(pipe, tmp_path / "samples", rec, gamma=None, layout_factory=None, images_per_prompt=[2, 1])
    assert len(manifest) == 3
    assert sorted(zip(manifest["prompt_index"], manifest["seed"], strict=True)) == [(0, 5), (0, 9), (1, 5)]
    assert (manifest["prompt"] == [PROMPTS[0], PROMPTS[0], PROMPTS[1]]).all()
    with pytest.raises(CastloraError, match="one count >= 1 per prompt"):
        run(pipe, tmp_path / "samples", rec, gamma=None, layout_factory=None, images_per_prompt=[2])


# --- layout control through the samples stage (docs/design.md#layout-control) --------------------------------


@pytest.fixture(scope="module")
def tiny_lora(pipe, tmp_path_factory: pytest.TempPathFactory) -> LoraRecord:
    """A random rank-2 LoRA file of the tiny U-Net, in the diffusers format the stage loads."""
    unet = copy.deepcopy(pipe.unet)
    spec = LoraSpec(rank=2, alpha=2.0)
    add_unet_lora(unet, spec)
    path = save_diffusers_lora(tmp_path_factory.mktemp("lora"), unet_lora_state_dict(unet), spec)
    return LoraRecord("v0001", {"diffusers": path}, {"diffusers": sha256_file(path)})


def stage_layouts() -> PairLayouts:
    return PairLayouts({s.character_id: [s] for s in SegMixLayouts().subjects}, (SIDE, SIDE))


BOXES = {"dog6": [0.0, 0.0, 0.45, 0.9], "dog2": [0.5, 0.4, 1.0, 1.0]}
LAYOUT_PROMPTS = [
    "olis dog and vrin dog in a park",
    {"prompt": "olis dog beside vrin dog", "layout": {"mode": "boxes", "boxes": BOXES}},
    {"prompt": "olis dog sitting on vrin dog", "layout": "llm"},
    {"prompt": "a big olis dog and a small vrin dog", "layout": {"mode": "sizes", "sizes": {"dog6": 2, "dog2": 1}}},
]


def test_each_prompt_renders_from_its_layout_and_records_it(pipe, tiny_lora, tmp_path: Path) -> None:
    entries = parse_prompt_entries(LAYOUT_PROMPTS, ["dog6", "dog2"])
    pair = stage_layouts()
    settings = RenderSettings(height=SIDE, width=SIDE, steps=1, guidance_scale=5.0)  # the layouts are under test
    rec = recorder(tmp_path / "lineage", "layouts")
    try:
        with start_chat_server(replies=['{"boxes": "left and right"}'] * 3) as chat:
            chat_client = OpenAICaptioner(OpenAICaptionerConfig(base_url=chat.url, model="m", max_retries=0))
            manifest = run_samples(
                pipe=pipe,
                lora=tiny_lora,
                prompts=entries,
                seeds=[5],
                layouts=pair,
                gamma=1.0,
                settings=settings,
                out_dir=tmp_path / "samples",
                recorder=rec,
                layout_client=chat_client,
                llm_retries=2,
            )
    finally:
        pipe.unload_lora_weights()
    rec.flush()
    rows = manifest.to_dict("records")
    assert [r["layout_origin"] for r in rows] == ["auto", "user", "auto", "user"]
    assert len(chat.requests) == 3  # the bad answer was asked again twice, then auto
    assert [bool(r["layout_warning"]) for r in rows] == [False, False, True, False]
    assert "samples prompt 3 ('olis dog sitting on vrin dog') llm layout" in rows[2]["layout_warning"]
    # auto (and the fallback) is today's layout of the seed, shared; each own layout has its own file.
    assert rows[0]["layout_sha256"] == rows[2]["layout_sha256"] == save_sha(pair.segmix(5).image, tmp_path)
    assert Path(rows[0]["layout_path"]).name == "layout_s5.png"
    assert Path(rows[1]["layout_path"]).name == "layout_p001_s5.png"
    for row in rows:
        assert json.loads(row["layout_labels_json"]) == ["dog6", "dog2"]
    placed = dict(zip(["dog6", "dog2"], json.loads(rows[1]["layout_boxes_json"]), strict=True))
    for cid, box in BOXES.items():
        x0, y0, x1, y1 = pixel_box(tuple(box), (SIDE, SIDE))
        assert x0 <= placed[cid][0] < placed[cid][2] <= x1 and y0 <= placed[cid][1] < placed[cid][3] <= y1
    sized = dict(zip(["dog6", "dog2"], json.loads(rows[3]["layout_boxes_json"]), strict=True))
    assert (sized["dog6"][3] - sized["dog6"][1]) / (sized["dog2"][3] - sized["dog2"][1]) == pytest.approx(2, abs=0.1)
    # The image's lineage names its layout's origin and warning.
    by_sha = {row["artifact_sha256"]: row for row in read_lineage(tmp_path / "lineage").to_pylist()}
    params = json.loads(by_sha[rows[2]["sha256"]]["params_json"])
    assert params["layout_origin"] == "auto" and params["layout_warning"] == rows[2]["layout_warning"]

    # The metadata grid draws each image's layout boxes, coloured per character.
    with_boxes = np.asarray(layout_grid(manifest))
    without = np.asarray(layout_grid(manifest.assign(layout_boxes_json=None)))
    assert with_boxes.shape == without.shape
    red = (with_boxes == subject_colour(0)).all(axis=-1).sum() - (without == subject_colour(0)).all(axis=-1).sum()
    blue = (with_boxes == subject_colour(1)).all(axis=-1).sum() - (without == subject_colour(1)).all(axis=-1).sum()
    assert red > 50 and blue > 50


def save_sha(image: Image.Image, folder: Path) -> str:
    return save_png(image, folder / "expected_layout.png")


def test_a_layout_without_the_init_is_refused_before_anything_loads(pipe, tmp_path: Path) -> None:
    entries = parse_prompt_entries(LAYOUT_PROMPTS[:2], ["dog6", "dog2"])
    missing = LoraRecord("v0001", {"diffusers": tmp_path / "no-such-lora.safetensors"}, {"diffusers": LORA_SHA})
    settings = RenderSettings(height=SIDE, width=SIDE, steps=2, guidance_scale=5.0)
    with pytest.raises(LayoutError, match=r"samples prompt 2 \('olis dog beside vrin dog'\) asks for a boxes layout"):
        run_samples(
            pipe=pipe,
            lora=missing,
            prompts=entries,
            seeds=[5],
            layouts=stage_layouts(),
            gamma=None,
            settings=settings,
            out_dir=tmp_path / "samples",
            recorder=recorder(tmp_path / "lineage", "x"),
        )
    assert not (tmp_path / "samples").exists()


def test_a_layout_that_cannot_be_made_fails_naming_its_prompt_before_anything_loads(pipe, tmp_path: Path) -> None:
    entries = parse_prompt_entries(
        [{"prompt": "a giant olis dog", "layout": {"mode": "sizes", "sizes": {"dog6": 40, "dog2": 1}}}],
        ["dog6", "dog2"],
    )
    missing = LoraRecord("v0001", {"diffusers": tmp_path / "no-such-lora.safetensors"}, {"diffusers": LORA_SHA})
    with pytest.raises(LayoutError, match=r"samples prompt 1 \('a giant olis dog'\): its sizes layout for seed 5"):
        run_samples(
            pipe=pipe,
            lora=missing,
            prompts=entries,
            seeds=[5],
            layouts=stage_layouts(),
            gamma=1.0,
            settings=RenderSettings(height=SIDE, width=SIDE, steps=1, guidance_scale=5.0),
            out_dir=tmp_path / "samples",
            recorder=recorder(tmp_path / "lineage", "y"),
        )
    assert not (tmp_path / "samples").exists()
