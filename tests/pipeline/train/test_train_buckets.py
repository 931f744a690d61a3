"""Aspect-ratio buckets (docs/design.md#aspect-ratio-buckets): bucket sizes and assignment, one bucket per batch,
latents cached per bucket and crop, SDXL's time ids and the masked loss's masks on non-square buckets."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipeline.buckets import Bucket, bucket_sizes, cover_crop, nearest_bucket, parse_aspects
from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.train import TrainConfig
from pipeline.train.caches import LatentCache, build_latent_cache, center_crop_top_left, module_identity
from pipeline.train.data import (
    INSTANCE,
    PRIOR,
    SEGMIX,
    BucketedPools,
    SamplePools,
    TrainingSample,
    plan_bucketed_step,
    plan_step,
)
from pipeline.train.runtime import make_accelerator
from pipeline.train.trainer import Trainer
from tests.pipeline.train.conftest import write_image, write_mask

RES = 64


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("resolution", [64, 256, 1024])
def test_aspect_buckets_are_multiples_near_resolution_squared(multiple, resolution):
    buckets = bucket_sizes("aspect", resolution, multiple)
    assert len(set(buckets)) == len(buckets) and Bucket(resolution, resolution) in buckets
    for bucket in buckets:
        assert bucket.width % multiple == 0 and bucket.height % multiple == 0
        # Each side is rounded by at most multiple/2, so the area is off by at most about that times the sides.
        assert abs(bucket.width * bucket.height - resolution**2) <= multiple * (bucket.width + bucket.height) / 2
    if resolution >= 256:  # large enough that every ratio keeps its own bucket, close to its aspect
        assert len(buckets) == 7
        for ratio in parse_aspects("aspect"):
            best = nearest_bucket(*ratio, buckets)
            assert abs(math.log(best.aspect) - math.log(ratio[0] / ratio[1])) < 0.1
    assert bucket_sizes("square", resolution, multiple) == (Bucket(resolution, resolution),)


def test_images_go_to_the_nearest_bucket():
    buckets = bucket_sizes("aspect", 1024, 8)
    by_ratio = {ratio: nearest_bucket(*ratio, buckets) for ratio in parse_aspects("aspect")}
    assert nearest_bucket(800, 600, buckets) == by_ratio[(4, 3)]
    assert nearest_bucket(600, 800, buckets) == by_ratio[(3, 4)]
    assert nearest_bucket(1000, 990, buckets) == Bucket(1024, 1024)
    assert nearest_bucket(1920, 1080, buckets) == by_ratio[(16, 9)]
    assert nearest_bucket(4000, 1000, buckets) == by_ratio[(16, 9)]  # beyond the widest: the widest
    assert by_ratio[(16, 9)].width > by_ratio[(16, 9)].height


def test_bad_bucket_settings_are_refused_by_name():
    with pytest.raises(CastloraError, match="buckets='wide'"):
        TrainConfig(buckets="wide")
    with pytest.raises(CastloraError, match="beyond"):
        TrainConfig(buckets="1:1,9:1")
    assert parse_aspects("1:1, 3:4") == ((1, 1), (3, 4))
    assert "buckets" not in TrainConfig(steps=1, resolution=64, mixed_precision="no").result_fields()
    assert TrainConfig(steps=1, resolution=64, mixed_precision="no", buckets="aspect").result_fields()["buckets"]
    # A LoRA record written before buckets existed trained square crops: it rebuilds as exactly that.
    record = TrainConfig(steps=1, resolution=64, mixed_precision="no").as_record()
    del record["buckets"]
    assert TrainConfig.from_record(record, "old record").buckets == "square"


def test_cover_crop_keeps_the_square_policy_and_covers_other_buckets():
    assert cover_crop(80, 64, Bucket(64, 64)) == cover_crop(80, 64, Bucket(64, 64))
    square = cover_crop(80, 64, Bucket(64, 64))
    assert square.resized == (80, 64) and (square.top, square.left) == center_crop_top_left((64, 80), 64)
    wide = cover_crop(100, 50, Bucket(64, 48))  # scale 0.96: 96x48, 32 px too wide, 16 cut each side
    assert wide.resized == (96, 48) and (wide.top, wide.left) == (0, 16)
    tall = cover_crop(100, 50, Bucket(48, 64))  # scale 1.28: 128x64
    assert tall.resized == (128, 64) and (tall.top, tall.left) == (0, 40)


def fake(name: str, kind: str) -> TrainingSample:
    return TrainingSample(name, f"{name}.png", name, kind)


def test_a_batch_never_mixes_buckets_and_the_plan_is_seeded():
    wide, tall, square = Bucket(88, 48), Bucket(48, 88), Bucket(64, 64)
    samples = [fake(f"w{i}", INSTANCE) for i in range(3)] + [fake(f"t{i}", INSTANCE) for i in range(2)]
    samples += [fake(f"s{i}", SEGMIX) for i in range(4)] + [fake(f"p{i}", PRIOR) for i in range(3)]
    home = {s.sample_id: {"w": wide, "t": tall, "s": square, "p": square}[s.sample_id[0]] for s in samples}
    bucketed = BucketedPools.of(samples, home)
    assert set(bucketed.by_bucket) == {wide, tall, square}
    placements = bucketed.placements()
    assert {s.sample_id for s in placements[wide]} == {"w0", "w1", "w2", "p0", "p1", "p2"}  # priors brought here

    seen = set()
    for step in range(150):
        bucket, instance, prior = plan_bucketed_step(bucketed, 5, step, 3, 0.3, True)
        assert (bucket, instance, prior) == plan_bucketed_step(bucketed, 5, step, 3, 0.3, True)
        assert all(home[s.sample_id] == bucket for s in instance)
        assert len(prior) == 3 and all(s in placements[bucket] for s in prior)
        seen.add(bucket)
    assert seen == {wide, tall, square}
    runs = [plan_bucketed_step(bucketed, 6, step, 3, 0.3, True)[0] for step in range(30)]
    assert runs != [plan_bucketed_step(bucketed, 5, step, 3, 0.3, True)[0] for step in range(30)]

    # One bucket (buckets: square) draws exactly what the plan without buckets draws.
    single = BucketedPools.of(samples, dict.fromkeys(home, square))
    pools = SamplePools.of(samples)
    for step in range(20):
        assert plan_bucketed_step(single, 1, step, 2, 0.3, True)[1:] == plan_step(pools, 1, step, 2, 0.3, True)


def test_latents_are_cached_per_bucket_and_crop(tiny_pipe, tmp_path):
    path = tmp_path / "wide.png"
    sample = TrainingSample(write_image(path, (200, 40, 40), size=(120, 60), stripes=True), str(path), "x", INSTANCE)
    vae, cache_dir = tiny_pipe.vae, tmp_path / "cache"
    wide, square = Bucket(88, 48), Bucket(64, 64)
    first, stats = build_latent_cache(vae, [sample], RES, cache_dir, bucket=wide)
    assert (stats.hits, stats.misses) == (0, 1)
    entry = first[sample.sample_id]
    assert tuple(entry.latent.shape[-2:]) == (48 // 8, 88 // 8)
    assert entry.original_size == (60, 120) and entry.crop_top_left == (0, (96 - 88) // 2)
    _, stats = build_latent_cache(vae, [sample], RES, cache_dir, bucket=wide)
    assert (stats.hits, stats.misses) == (1, 0)  # same bucket: served from the cache
    other, stats = build_latent_cache(vae, [sample], RES, cache_dir, bucket=square)
    assert (stats.hits, stats.misses) == (0, 1)  # another bucket: encoded again
    assert tuple(other[sample.sample_id].latent.shape[-2:]) == (8, 8)
    cache = LatentCache(cache_dir, module_identity(vae), RES, bucket=wide)
    assert cache.key(sample.sample_id, (0, 4)) != cache.key(sample.sample_id, (0, 0))  # the crop is in the key
    assert cache.get(sample.sample_id, (0, 0)) is None and cache.get(sample.sample_id, (0, 4)) is not None


@pytest.fixture
def bucket_samples(tmp_path) -> list[TrainingSample]:
    """A wide photo (2:1), a tall composite (1:2, with a mask) and a square class image."""
    specs = [
        ("wide", INSTANCE, (200, 40, 40), (128, 64), "a photo of olis dog"),
        ("tall", SEGMIX, (40, 200, 40), (48, 96), "olis dog and vrin dog"),
        ("square", PRIOR, (40, 40, 200), (64, 64), "a photo of a dog"),
    ]
    samples = []
    for name, kind, colour, size, prompt in specs:
        path = tmp_path / f"{name}.png"
        sha = write_image(path, colour, size=size, stripes=True)
        mask = write_mask(tmp_path / f"{name}_mask.png", size=size) if kind != INSTANCE else None
        samples.append(TrainingSample(sha, str(path), prompt, kind, mask))
    return samples


def test_sdxl_time_ids_and_masks_follow_the_bucket(tiny_pipe, bucket_samples, tmp_path):
    config = TrainConfig(
        steps=2, resolution=RES, mixed_precision="no", rank=4, alpha=4, segmix_p=0.5, prior_weight=1.0,
        masked_loss=True, buckets="aspect",
    )  # fmt: skip
    family = family_for(tiny_pipe)
    multiple = family.size_multiple(tiny_pipe)
    assert multiple == family.downsampling_factor(tiny_pipe)  # a U-Net: no patches
    trainer = Trainer(tiny_pipe, bucket_samples, config, make_accelerator(config))
    trainer.build_caches(tmp_path / "cache")
    trainer.setup_models()
    trainer.prepare()
    wide, tall, square = (trainer.bucketed.home[s.sample_id] for s in bucket_samples)
    assert wide.aspect > 1 > tall.aspect and square == Bucket(RES, RES)
    assert wide.width % multiple == 0 and tall.height % multiple == 0

    captured: list[dict] = []
    hook = tiny_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
    )
    try:
        by_bucket = {}
        for step in range(40):
            batch = trainer.batch(step)
            by_bucket.setdefault(tuple(batch.latents.shape[-2:]), (step, batch))
            if len(by_bucket) == 2:
                break
        assert set(by_bucket) == {(wide.height // 8, wide.width // 8), (tall.height // 8, tall.width // 8)}
        for step, batch in by_bucket.values():
            bucket = wide if batch.latents.shape[-1] > batch.latents.shape[-2] else tall
            # The masked loss's masks are on the same (non-square) latent grid as the latents.
            assert batch.masks.shape[-2:] == batch.latents.shape[-2:]
            trainer.loss(step, batch)
            time_ids = captured[-1]
            instance, prior = time_ids[0].tolist(), time_ids[1].tolist()
            source = bucket_samples[0] if bucket is wide else bucket_samples[1]
            width, height = (128, 64) if bucket is wide else (48, 96)
            crop = cover_crop(width, height, bucket)
            assert instance == [height, width, crop.top, crop.left, bucket.height, bucket.width], source.image_path
            # The square class image, brought to this bucket too: its own size, its own crop, the same target.
            crop = cover_crop(64, 64, bucket)
            assert prior == [64, 64, crop.top, crop.left, bucket.height, bucket.width]
            assert crop.top + crop.left > 0
        tall_batch = by_bucket[(tall.height // 8, tall.width // 8)][1]
        mask = tall_batch.masks[0, 0]  # the tall composite's mask: its left quarter, cropped like the image
        assert mask[:, 0].mean() > 0.9 and mask[:, -1].mean() < 0.1
    finally:
        hook.remove()
        trainer.remove_reference()


def test_square_buckets_keep_one_bucket_without_reading_images(tiny_pipe, bucket_samples):
    config = TrainConfig(steps=1, resolution=RES, mixed_precision="no", rank=4, alpha=4, segmix_p=0.5)
    missing = replace(bucket_samples[0], image_path="/nonexistent.png")  # never opened with one bucket
    trainer = Trainer(tiny_pipe, [missing, *bucket_samples[1:]], config, make_accelerator(config))
    assert trainer.buckets == (Bucket(RES, RES),) and set(trainer.bucketed.home.values()) == {Bucket(RES, RES)}


def test_a_bucketed_run_resumes_onto_the_same_path(tiny_pipe, bucket_samples, tmp_path):
    """The plan is a pure function of (seed, step) with buckets too: a killed run resumes onto the uninterrupted
    trajectory, and a checkpoint does not resume under another bucket setting."""
    from pipeline.errors import CheckpointError
    from pipeline.train import train_lora

    config = TrainConfig(
        steps=4, resolution=RES, mixed_precision="no", rank=4, alpha=4, lr=1e-3, segmix_p=0.5, checkpoint_every=2,
        log_every=1, buckets="aspect",
    )  # fmt: skip
    cache = tmp_path / "cache"
    expected = train_lora(tiny_pipe, bucket_samples, config, tmp_path / "full", cache)

    class Killed(Exception):
        pass

    def kill_after_3(done: int, metrics: dict) -> None:
        if done == 3:
            raise Killed

    with pytest.raises(Killed):
        train_lora(tiny_pipe, bucket_samples, config, tmp_path / "out", cache, on_log=kill_after_3)
    resumed = train_lora(tiny_pipe, bucket_samples, config, tmp_path / "out", cache)
    assert resumed.resumed_from == 2 and resumed.losses == expected.losses
    for key, value in expected.lora_state.items():
        assert torch.equal(resumed.lora_state[key], value), key
    with pytest.raises(CheckpointError, match=r"different training setup.*buckets"):
        train_lora(tiny_pipe, bucket_samples, replace(config, buckets="1:1,2:1"), tmp_path / "out", cache)
