"""Stage functions on their own (no Dagster): user masks win, models load lazily, class images resume."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.images import IntakeConfig, mask_to_image
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import SegmentConfig
from pipeline.segment.grabcut import GrabCutSegmenter
from pipeline.spec import load_spec
from pipeline.stages.class_images import run_class_images
from pipeline.stages.references import run_references
from pipeline.stages.segments import run_segments
from pipeline.storage.lineage import LineageRecorder
from tests.conftest import subject_photo


def _recorder(tmp_path: Path, asset: str) -> LineageRecorder:
    return LineageRecorder(tmp_path / "lineage", "run", asset, "a__b", "test")


class CountingLoader:
    """Counts how often the stage asks for the (expensive) segmenter."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return GrabCutSegmenter()


@pytest.fixture
def references(tmp_path, make_pair):
    folder = make_pair("a__b")
    spec = load_spec(folder)
    out = run_references(
        spec=spec,
        out_dir=tmp_path / "refs",
        config=IntakeConfig(min_side=128),
        recorder=_recorder(tmp_path, "references"),
    )
    return folder, out.manifest


def test_user_masks_take_precedence_and_skip_the_model(tmp_path, references):
    folder, manifest = references
    masks_dir = folder / "a_masks"
    masks_dir.mkdir()
    for source in manifest[manifest["character_id"] == "a"]["source"]:
        mask = np.zeros((256, 320), dtype=bool)
        mask[40:200, 60:260] = True
        mask_to_image(mask).save(masks_dir / f"{Path(source).stem}.png")
    loader = CountingLoader()
    result = run_segments(
        references=manifest[manifest["character_id"] == "a"],
        masks_dirs={"a": str(masks_dir)},
        out_dir=tmp_path / "segs",
        load_segmenter=loader,
        config=SegmentConfig(),
        recorder=_recorder(tmp_path, "segments"),
    )
    assert loader.calls == 0
    assert set(result["segmenter"]) == {"user mask"} and set(result["status"]) == {"ok"}
    assert result["bbox"].map(list).tolist() == [[60, 40, 260, 200]] * 3
    with Image.open(result["cutout_path"].iloc[0]) as cutout:
        assert cutout.mode == "RGBA" and cutout.size == (200, 160)


def test_segmenter_loads_once_for_all_characters(tmp_path, references):
    _, manifest = references
    loader = CountingLoader()
    result = run_segments(
        references=manifest,
        masks_dirs={},
        out_dir=tmp_path / "segs",
        load_segmenter=loader,
        config=SegmentConfig(),
        recorder=_recorder(tmp_path, "segments"),
    )
    assert loader.calls == 1
    assert set(result["segmenter"]) == {"grabcut (classical fallback)"}
    assert (result["status"] == "ok").all()
    assert all(Path(p).is_file() for p in result["cutout_path"])


class FakePipeline:
    """Stands in for the diffusion pipeline: a coloured disc whose colour encodes the generator seed."""

    def __init__(self):
        self.images_made = 0

    def __call__(self, prompt, generator, num_images_per_prompt=1, **kwargs):
        images = []
        for g in generator if isinstance(generator, list) else [generator]:
            seed = g.initial_seed()
            images.append(subject_photo((kwargs["width"], kwargs["height"]), seed=seed, colour=(seed % 200, 30, 90)))
        self.images_made += len(images)
        return type("Output", (), {"images": images})()


def test_class_images_resume_without_regenerating(tmp_path, make_pair):
    spec = load_spec(make_pair("a__b"))
    fake = FakePipeline()
    config = ClassImageConfig(count=3, resolution=128, steps=1, guidance_scale=5.0, batch_size=1)

    def run():
        return run_class_images(
            spec=spec,
            out_dir=tmp_path / "cls",
            config=config,
            load_pipeline=lambda: fake,
            base_model_id="fake-model",
            load_segmenter=CountingLoader(),
            segment_config=SegmentConfig(),
            recorder=_recorder(tmp_path, "class_images"),
        )

    first = run()
    assert fake.images_made == 3 and len(first) == 3
    Path(first["path"].iloc[1]).unlink()  # an interrupted run left image 1 missing
    second = run()
    assert fake.images_made == 4  # only the missing image was generated again
    pd.testing.assert_series_equal(first["sha256"], second["sha256"])
    assert (second["origin"] == "generated").all()
    assert second["seed"].tolist() == [0, 1, 2]
    assert second["prompt"].tolist() == ["a photo of a dog"] * 3  # the generation prompt, trained with


def test_class_images_import_a_folder(tmp_path, make_pair):
    folder = make_pair("a__b")
    class_dir = folder / "class_dogs"
    class_dir.mkdir()
    for n in range(2):
        subject_photo((200, 160), seed=50 + n).save(class_dir / f"{n}.jpg")
    (class_dir / "readme.txt").write_text("not an image")
    (folder / "pair.yaml").write_text((folder / "pair.yaml").read_text() + "class_images:\n  dog: class_dogs\n")
    spec = load_spec(folder)

    def fail_to_load():
        raise AssertionError("imported class images must not load the base model")

    result = run_class_images(
        spec=spec,
        out_dir=tmp_path / "cls",
        config=ClassImageConfig(count=5, prompt_template="a snapshot of a {class_noun}"),
        load_pipeline=fail_to_load,
        base_model_id="unused",
        load_segmenter=CountingLoader(),
        segment_config=SegmentConfig(),
        recorder=_recorder(tmp_path, "class_images"),
    )
    assert len(result) == 2
    assert all(origin.startswith("imported:") for origin in result["origin"])
    assert result["prompt"].tolist() == ["a snapshot of a dog"] * 2  # no generation prompt: the configured one
    assert (result["status"] == "ok").all()
