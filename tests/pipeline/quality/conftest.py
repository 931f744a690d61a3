"""Fixtures for the iteration and evaluation stages: a tiny SDXL with a trained tiny LoRA, a real D&C scorer
(layout detector, tiny DINOv2; CLIP deliberately unconfigured), and Seg-Mix layouts of two coloured blocks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.dnc.image_scores import SubjectReferences
from pipeline.dnc.pair_scorer import load_dnc_scorer
from pipeline.infer import layout_from_composite
from pipeline.lora.versions import TrainingRun
from pipeline.segmix.compose import SegMixConfig, SegMixSubject, compose
from pipeline.stages.lora import run_lora
from pipeline.storage.lineage import LineageRecorder
from pipeline.train import TrainConfig, TrainingSample

SIDE = 64
COLOURS = ((220, 30, 30), (30, 40, 210))
PHRASES = ("olis dog", "vrin dog")


def block(colour, width: int, height: int, alpha: bool = True) -> Image.Image:
    pixels = np.zeros((height, width, 4 if alpha else 3), dtype=np.uint8)
    pixels[...] = (*colour, 255) if alpha else colour
    return Image.fromarray(pixels)


class CountingFactory:
    """The pipe factory the stages call; counts loads so tests can prove nothing was redone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls = 0

    def __call__(self):
        from diffusers import StableDiffusionXLPipeline

        self.calls += 1
        pipe = StableDiffusionXLPipeline.from_pretrained(self.folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def layout_for(seed: int):
    subjects = [SegMixSubject(block(c, 24, 28), p, p.split()[0]) for c, p in zip(COLOURS, PHRASES, strict=True)]
    return layout_from_composite(compose(subjects, SegMixConfig(canvas=(SIDE, SIDE), max_occlusion=1.0), seed))


@pytest.fixture(scope="session")
def quality(tmp_path_factory) -> SimpleNamespace:
    from pipeline.models.tiny_embedders import build_tiny_dinov2
    from pipeline.models.tiny_sdxl import build_tiny_sdxl

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quality")
    build_tiny_sdxl(root / "sdxl")
    build_tiny_dinov2(root / "dinov2")
    factory = CountingFactory(root / "sdxl")

    images = root / "train"
    images.mkdir()
    samples = []
    for index, colour in enumerate(COLOURS):
        path = images / f"{index}.png"
        block(colour, SIDE, SIDE, alpha=False).save(path)
        from pipeline.storage.hashing import sha256_file

        samples.append(TrainingSample(sha256_file(path), str(path), f"a photo of {PHRASES[index]}", "instance"))
    config = TrainConfig(
        steps=2, rank=4, alpha=4.0, resolution=SIDE, mixed_precision="no", segmix_p=0.0, prior_weight=0.0, lr=1e-3
    )
    recorder = LineageRecorder(root / "lineage", "setup", "lora", "olis__vrin", "test")
    run = TrainingRun(root / "lora", root / "cache", recorder, "tiny-sdxl")
    base = run_lora(pipe=factory(), samples=samples, config=config, run=run)

    references = [
        SubjectReferences(p.split()[0], "dog", [block(c, 40, 40, alpha=False) for _ in range(2)])
        for c, p in zip(COLOURS, PHRASES, strict=True)
    ]
    scorer = load_dnc_scorer(
        references,
        detector="layout",
        detector_source="",
        threshold=0.4,
        embedder_sources={"dinov2": str(root / "dinov2"), "clip": ""},
        cache_root=root / "models",
    )
    yield SimpleNamespace(root=root, factory=factory, base=base, train_config=config, scorer=scorer, samples=samples)
    torch.set_num_threads(previous)
