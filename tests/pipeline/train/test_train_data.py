"""Samples from the stage manifests, and the per-step plan (deterministic, proportions as configured)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import CastloraError
from pipeline.storage.manifest import write_manifest
from pipeline.train.config import TrainConfig
from pipeline.train.data import (
    INSTANCE,
    PRIOR,
    PRIOR_SEGMIX,
    SEGMIX,
    SamplePools,
    TrainingSample,
    plan_step,
)
from pipeline.train.training_set import build_samples, load_samples

REPO = Path(__file__).resolve().parents[3]


def write_pair_manifests(pair_dir) -> None:
    (pair_dir / "references").mkdir(parents=True)
    write_manifest(
        pd.DataFrame({"path": ["/r/a.png", "/r/b.png"], "sha256": ["a" * 64, "b" * 64], "character_id": ["x", "y"]}),
        pair_dir / "references",
    )
    (pair_dir / "captions").mkdir()
    write_manifest(
        pd.DataFrame({"reference_sha256": ["b" * 64, "a" * 64], "caption": ["vrin dog on a sofa", "olis dog"]}),
        pair_dir / "captions",
    )
    (pair_dir / "segments").mkdir()
    write_manifest(
        pd.DataFrame(
            {
                "reference_path": ["/r/a.png", "/r/b.png"],
                "status": ["ok", "no_detection"],
                "mask_path": ["/s/a_mask.png", None],
            }
        ),
        pair_dir / "segments",
    )
    (pair_dir / "segmix_bank").mkdir()
    write_manifest(
        pd.DataFrame(
            {
                "kind": ["instance", "prior"],
                "image_path": ["/b/i0.png", "/b/p0.png"],
                "image_sha256": ["c" * 64, "d" * 64],
                "union_mask_path": ["/b/i0_union.png", "/b/p0_union.png"],
                "prompt": ["olis dog and vrin dog", "a dog and a dog"],
            }
        ),
        pair_dir / "segmix_bank",
    )
    (pair_dir / "class_images").mkdir()
    write_manifest(
        pd.DataFrame(
            {
                "path": ["/c/0.png", "/c/1.png"],
                "sha256": ["e" * 64, "f" * 64],
                "class_noun": ["dog", "dog"],
                "status": ["ok", "no_detection"],
                "mask_path": ["/c/0_mask.png", None],
                "prompt": ["a studio photo of a dog", "a studio photo of a dog"],
            }
        ),
        pair_dir / "class_images",
    )


def test_samples_from_manifests(tmp_path):
    write_pair_manifests(tmp_path)
    samples = {s.sample_id[0]: s for s in load_samples(tmp_path)}
    assert samples["a"] == TrainingSample("a" * 64, "/r/a.png", "olis dog", INSTANCE, "/s/a_mask.png")
    assert samples["b"].prompt == "vrin dog on a sofa" and samples["b"].mask_path is None
    assert (samples["c"].kind, samples["c"].mask_path) == (SEGMIX, "/b/i0_union.png")
    assert (samples["d"].kind, samples["d"].prompt) == (PRIOR_SEGMIX, "a dog and a dog")
    assert (samples["e"].kind, samples["e"].prompt, samples["e"].mask_path) == (
        PRIOR,
        "a studio photo of a dog",  # the prompt the class image was generated from, not a hard-coded one
        "/c/0_mask.png",
    )
    assert samples["f"].mask_path is None  # unsegmented class image: still a prior image, whole-image loss
    assert not any(s.is_prior for s in load_samples(tmp_path, with_prior=False))


def test_class_images_manifest_without_prompts_is_refused(tmp_path):
    write_pair_manifests(tmp_path)
    manifest = pd.read_parquet(tmp_path / "class_images" / "manifest.parquet").drop(columns=["prompt"])
    write_manifest(manifest, tmp_path / "class_images")
    with pytest.raises(CastloraError, match=r"class_images.*re-materialize 'class_images'"):
        load_samples(tmp_path)


def test_reference_without_caption_is_an_error():
    references = pd.DataFrame({"path": ["/r/a.png"], "sha256": ["a" * 64]})
    captions = pd.DataFrame({"reference_sha256": ["z" * 64], "caption": ["x"]})
    with pytest.raises(CastloraError, match=r"/r/a\.png has no caption"):
        build_samples(references, captions)


def pools(n: int = 5) -> SamplePools:
    samples = [
        TrainingSample(f"{kind}{i:03d}", f"/{kind}/{i}.png", kind, kind)
        for kind in (INSTANCE, SEGMIX, PRIOR, PRIOR_SEGMIX)
        for i in range(n)
    ]
    return SamplePools.of(samples)


def test_plan_is_a_pure_function_of_seed_and_step():
    p = pools()
    assert plan_step(p, 7, 123, 2, 0.3, True) == plan_step(p, 7, 123, 2, 0.3, True)
    runs = {tuple(s.sample_id for s in plan_step(p, 7, step, 2, 0.3, True)[0]) for step in range(40)}
    assert len(runs) > 10  # steps really differ
    assert [plan_step(p, 7, s, 1, 0.3, True) for s in range(20)] != [
        plan_step(p, 8, s, 1, 0.3, True) for s in range(20)
    ]


def test_pool_order_does_not_change_the_plan():
    forward = pools()
    shuffled = SamplePools.of([s for kind in reversed(list(forward.by_kind)) for s in reversed(forward.by_kind[kind])])
    assert [plan_step(forward, 1, s, 2, 0.3, True) for s in range(30)] == [
        plan_step(shuffled, 1, s, 2, 0.3, True) for s in range(30)
    ]


@pytest.mark.parametrize("draw", ["shared", "independent"])
@pytest.mark.parametrize("segmix_p", [0.0, 0.3, 0.8])
def test_segmix_and_prior_proportions_follow_the_config(segmix_p, draw):
    p, steps = pools(), 3000
    instance_kinds, prior_kinds = Counter(), Counter()
    for step in range(steps):
        instance, prior = plan_step(p, 0, step, 1, segmix_p, True, draw)
        instance_kinds.update(s.kind for s in instance)
        prior_kinds.update(s.kind for s in prior)
    assert sum(instance_kinds.values()) == sum(prior_kinds.values()) == steps  # one prior image per instance image
    assert instance_kinds[SEGMIX] / steps == pytest.approx(segmix_p, abs=0.03)
    assert prior_kinds[PRIOR_SEGMIX] / steps == pytest.approx(segmix_p, abs=0.03)
    assert set(instance_kinds) <= {INSTANCE, SEGMIX} and set(prior_kinds) <= {PRIOR, PRIOR_SEGMIX}


def test_no_prior_samples_when_prior_preservation_is_off():
    assert plan_step(pools(), 0, 5, 2, 0.3, False)[1] == []


def test_shared_draw_mixes_instance_and_prior_together_as_mudi_does():
    p = pools()
    for step in range(300):
        instance, prior = plan_step(p, 0, step, 3, 0.3, True)  # default: shared
        assert [s.kind == SEGMIX for s in instance] == [s.kind == PRIOR_SEGMIX for s in prior]
    independent = [plan_step(p, 0, step, 1, 0.5, True, "independent") for step in range(100)]
    assert any((i[0].kind == SEGMIX) != (q[0].kind == PRIOR_SEGMIX) for i, q in independent)
    assert TrainConfig().segmix_draw == "shared"
    with pytest.raises(CastloraError, match="segmix_draw"):
        TrainConfig(segmix_draw="sometimes")


def test_independent_draw_keeps_the_plans_of_earlier_castlora():
    """The old plan drew Seg-Mix for every instance image, then every prior image, from one generator."""
    p = pools()
    for step in range(50):
        rng = np.random.default_rng([0, step, 0xDA7A])
        expected = []
        for plain, mixed in ((INSTANCE, SEGMIX), (INSTANCE, SEGMIX), (PRIOR, PRIOR_SEGMIX), (PRIOR, PRIOR_SEGMIX)):
            pool = p.by_kind[mixed] if rng.random() < 0.3 else p.by_kind[plain]
            expected.append(pool[int(rng.integers(len(pool)))])
        instance, prior = plan_step(p, 0, step, 2, 0.3, True, "independent")
        assert instance + prior == expected


def test_segmix_p_with_an_empty_bank_is_refused_naming_the_bank():
    only_plain = SamplePools.of(
        [TrainingSample("a", "/a.png", "x", INSTANCE), TrainingSample("p", "/p.png", "y", PRIOR)]
    )
    with pytest.raises(CastloraError, match=r"segmix_p=0\.3 .*Seg-Mix bank \('segmix_bank'\)"):
        only_plain.check(prior_preservation=True, segmix_p=0.3)
    only_plain.check(prior_preservation=True, segmix_p=0.0)  # no Seg-Mix asked: plain images are fine


def test_bank_without_prior_composites_keeps_plain_class_images_in_the_prior_slot():
    no_prior_bank = SamplePools.of(
        [
            TrainingSample("a", "/a.png", "x", INSTANCE),
            TrainingSample("m", "/m.png", "x and y", SEGMIX),
            TrainingSample("p", "/p.png", "y", PRIOR),
        ]
    )
    no_prior_bank.check(prior_preservation=True, segmix_p=1.0)  # n_prior: 0 is a valid bank
    for step in range(20):
        instance, prior = plan_step(no_prior_bank, 0, step, 1, 1.0, True)
        assert instance[0].kind == SEGMIX and prior[0].kind == PRIOR


def test_training_process_does_not_import_pandas_or_opencv():
    """A training process (each accelerate rank, a script) imports ``pipeline.train``; pandas and OpenCV, which
    only the manifest readers need, would add ~90 MiB of RSS to every rank."""
    code = "import sys, pipeline.train, pipeline.train.worker; print(sorted({'pandas', 'cv2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
