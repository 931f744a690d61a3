"""Training options that must match MuDI / diffusers: the class images' own prompt, SDXL crop conditioning,
gradient accumulation, AdamW weight decay, an empty Seg-Mix bank, and dpo_beta outside the fingerprint."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch

from pipeline.errors import CastloraError
from pipeline.lora.versions import lora_version
from pipeline.prior_images import ClassImageConfig
from pipeline.segment import SegmentConfig
from pipeline.segment.grabcut import GrabCutSegmenter
from pipeline.spec import load_spec
from pipeline.stages.class_images import run_class_images
from pipeline.storage.lineage import LineageRecorder
from pipeline.train import TrainConfig, train_lora
from pipeline.train.caches import build_latent_cache
from pipeline.train.data import INSTANCE, PRIOR, SEGMIX, TrainingSample
from pipeline.train.loop import fingerprint_fields
from pipeline.train.runtime import make_accelerator
from pipeline.train.trainer import Trainer
from pipeline.train.training_set import build_samples
from tests.conftest import subject_photo
from tests.pipeline.train.conftest import write_image

RES = 64
BASE = TrainConfig(
    steps=2, resolution=RES, mixed_precision="no", rank=4, alpha=4, lr=1e-3, segmix_p=0, prior_weight=0, log_every=1
)


def ready_trainer(pipe, samples, config: TrainConfig, cache_dir) -> Trainer:
    trainer = Trainer(pipe, samples, config, make_accelerator(config))
    trainer.build_caches(cache_dir)
    trainer.setup_models()
    trainer.prepare()
    return trainer


class PromptRecordingPipeline:
    """Stands in for the base model when generating class images: remembers the prompts it was asked for."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, prompt, generator, **kwargs):
        self.prompts.extend(prompt)
        size = (kwargs["width"], kwargs["height"])
        images = [subject_photo(size, seed=g.initial_seed(), colour=(120, 60, 30)) for g in generator]
        return type("Output", (), {"images": images})()


def test_custom_class_prompt_reaches_the_training_batch(tiny_pipe, sample_set, make_pair, tmp_path):
    template = "a studio portrait of a {class_noun}, plain backdrop"
    fake = PromptRecordingPipeline()
    manifest = run_class_images(
        spec=load_spec(make_pair("a__b")),
        out_dir=tmp_path / "class_images",
        config=ClassImageConfig(
            count=2, resolution=RES, steps=1, guidance_scale=5.0, batch_size=2, prompt_template=template
        ),
        load_pipeline=lambda: fake,
        base_model_id="fake-model",
        load_segmenter=GrabCutSegmenter,
        segment_config=SegmentConfig(),
        recorder=LineageRecorder(tmp_path / "lineage", "run", "class_images", "a__b", "test"),
    )
    wanted = "a studio portrait of a dog, plain backdrop"
    assert fake.prompts == [wanted, wanted] and manifest["prompt"].tolist() == [wanted, wanted]

    references = pd.DataFrame({"path": [sample_set[0].image_path], "sha256": [sample_set[0].sample_id]})
    captions = pd.DataFrame({"reference_sha256": [sample_set[0].sample_id], "caption": [sample_set[0].prompt]})
    samples = build_samples(references, captions, class_images=manifest)
    assert {s.prompt for s in samples if s.kind == PRIOR} == {wanted}
    trainer = ready_trainer(tiny_pipe, samples, replace(BASE, prior_weight=1.0), tmp_path / "cache")
    batch = trainer.batch(0)
    assert batch.prompts[batch.n_instance :] == [wanted]  # the prior slot trains on the generation prompt
    assert batch.prompts[0] == sample_set[0].prompt


def test_crop_offsets_of_non_square_photos_reach_the_time_ids(tiny_pipe, tmp_path):
    wide = tmp_path / "wide.png"  # 80x64: resized to 80x64 at 64 px, the centre crop starts 8 px from the left
    tall = tmp_path / "tall.png"  # 48x96: resized to 64x128, the centre crop starts 32 px from the top
    samples = [
        TrainingSample(write_image(wide, (200, 40, 40), size=(80, 64)), str(wide), "a photo of olis dog", INSTANCE),
        TrainingSample(write_image(tall, (40, 200, 40), size=(48, 96)), str(tall), "a photo of vrin dog", INSTANCE),
    ]
    latents, _ = build_latent_cache(tiny_pipe.vae, samples, RES, tmp_path / "cache")
    assert latents[samples[0].sample_id].crop_top_left == (0, 8)
    assert latents[samples[1].sample_id].crop_top_left == (32, 0)
    again, stats = build_latent_cache(tiny_pipe.vae, samples, RES, tmp_path / "cache")
    assert stats.hits == 2 and again[samples[1].sample_id].crop_top_left == (32, 0)  # recorded in the cache

    trainer = ready_trainer(tiny_pipe, samples, replace(BASE, batch_size=1), tmp_path / "cache")
    rows = {}
    for step in range(12):
        batch = trainer.batch(step)
        rows[batch.prompts[0]] = batch.conditioning["time_ids"][0].tolist()
    assert rows["a photo of olis dog"] == [64, 80, 0, 8, RES, RES]  # (orig h, orig w, top, left, target h, w)
    assert rows["a photo of vrin dog"] == [96, 48, 32, 0, RES, RES]


def test_weight_decay_reaches_the_optimizer(tiny_pipe, sample_set, tmp_path):
    assert TrainConfig().adam_weight_decay == 1e-4  # diffusers' DreamBooth scripts and MuDI
    trainer = ready_trainer(tiny_pipe, sample_set[:1], replace(BASE, adam_weight_decay=0.03), tmp_path / "cache")
    assert [group["weight_decay"] for group in trainer.optimizer.param_groups] == [0.03]
    with pytest.raises(CastloraError, match="adam_weight_decay"):
        TrainConfig(adam_weight_decay=-1.0)


def test_accumulation_averages_the_micro_batches_and_steps_every_k(tiny_pipe, sample_set, tmp_path, monkeypatch):
    instance = [s for s in sample_set if s.kind == INSTANCE]
    config = replace(BASE, steps=2, gradient_accumulation_steps=2, max_grad_norm=0.0)
    seen: list[tuple[str, int | None]] = []
    first_grads: dict[str, torch.Tensor] = {}
    original_batch, original_optimize = Trainer.batch, Trainer.optimize

    def counting_batch(self, step):
        seen.append(("batch", step))
        return original_batch(self, step)

    def capturing_optimize(self):
        seen.append(("optimize", None))
        if not first_grads:
            first_grads.update({n: p.grad.clone() for n, p in self.denoiser.named_parameters() if p.requires_grad})
        return original_optimize(self)

    monkeypatch.setattr(Trainer, "batch", counting_batch)
    monkeypatch.setattr(Trainer, "optimize", capturing_optimize)
    result = train_lora(tiny_pipe, instance, config, tmp_path / "out", tmp_path / "cache")
    monkeypatch.undo()
    assert result.steps_done == 2 and len(result.losses) == 2
    # Optimizer step s consumes micro-batches 2s and 2s+1: the steps of an unaccumulated run of 4 steps.
    assert seen == [("batch", 0), ("batch", 1), ("optimize", None), ("batch", 2), ("batch", 3), ("optimize", None)]

    # The accumulated gradient equals one batch of both micro-batches: the mean of their gradients.
    reference = ready_trainer(tiny_pipe, instance, replace(config, gradient_accumulation_steps=1), tmp_path / "c2")
    total = sum(reference.loss(index, reference.batch(index))[0] for index in (0, 1)) / 2
    total.backward()
    expected = {n: p.grad for n, p in reference.denoiser.named_parameters() if p.requires_grad}
    assert set(expected) == set(first_grads) and first_grads
    for name, grad in expected.items():
        torch.testing.assert_close(first_grads[name], grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(CastloraError, match="gradient_accumulation_steps"):
        TrainConfig(gradient_accumulation_steps=0)


def test_segmix_p_with_an_empty_bank_is_an_error_naming_the_bank(tiny_pipe, sample_set, tmp_path):
    without_bank = [s for s in sample_set if s.kind != SEGMIX]
    with pytest.raises(CastloraError, match=r"segmix_p=0\.3.*'segmix_bank'.*set segmix_p=0"):
        train_lora(tiny_pipe, without_bank, replace(BASE, segmix_p=0.3), tmp_path / "out", tmp_path / "cache")


def test_dpo_beta_does_not_change_a_plain_loras_version_or_fingerprint(tiny_pipe, sample_set):
    plain, with_beta = BASE, replace(BASE, dpo_beta=2500.0)
    assert lora_version(plain, sample_set, "base") == lora_version(with_beta, sample_set, "base")
    assert fingerprint_fields(tiny_pipe, sample_set, plain, 1, "base") == fingerprint_fields(
        tiny_pipe, sample_set, with_beta, 1, "base"
    )
    # Diffusion-DPO is the objective where beta acts: there it is part of the identity.
    assert lora_version(plain, sample_set, "base", preference=True) != lora_version(
        with_beta, sample_set, "base", preference=True
    )


def test_a_changed_prior_prompt_is_another_lora_version(sample_set):
    renamed = [replace(s, prompt="a studio portrait of a dog") if s.kind == PRIOR else s for s in sample_set]
    assert lora_version(BASE, sample_set, "base") != lora_version(BASE, renamed, "base")
