"""A round of iterative training from a LoRA with a text-encoder part: both text encoders start from model k's
LoRA, and the KL reference is model k whole (its text encoders included), frozen."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.families.sdxl import SDXL
from pipeline.lora.adapters import DEFAULT_ADAPTER
from pipeline.lora.training import REFERENCE_ADAPTER, split_init_lora
from pipeline.lora.versions import TrainingRun
from pipeline.stages.iteration import _lora_state
from pipeline.stages.lora import run_lora
from pipeline.storage.lineage import LineageRecorder
from pipeline.train import TrainConfig, train_lora

TE = TrainConfig(
    steps=3, resolution=64, mixed_precision="no", rank=4, alpha=4, lr=1e-2, prior_weight=0, segmix_p=0.0,
    train_text_encoder=True, log_every=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def fresh_pipe(tiny_sdxl_dir, one_thread):
    """Its own pipe: these runs leave text-encoder adapters, which the shared ``tiny_pipe`` must not have."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model_k(fresh_pipe, sample_set, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Round k's exported LoRA, read back as the iteration reads it: U-Net and both text-encoder parts."""
    root = tmp_path_factory.mktemp("model_k")
    recorder = LineageRecorder(root / "lineage", "run", "lora", "olis__vrin", "test")
    run = TrainingRun(root / "lora", root / "cache", recorder, "tiny-sdxl")
    out = run_lora(pipe=fresh_pipe, samples=sample_set, config=TE, run=run)
    state = _lora_state(out.files["diffusers"], fresh_pipe)
    _, text = split_init_lora(state, SDXL.denoiser, SDXL.text_encoders)
    assert set(text) == set(SDXL.text_encoders)
    assert any(v.abs().sum() > 0 for k, v in text["text_encoder"].items() if ".up." in k)  # not a fresh adapter
    return state


def test_round_k_plus_1_starts_from_model_k_text_encoder_lora(fresh_pipe, sample_set, model_k, tmp_path):
    # One step at a negligible learning rate: what comes out is where training started.
    still = dataclasses.replace(TE, steps=1, lr=1e-12, text_encoder_lr=1e-12, kl_weight=1.0)
    result = train_lora(fresh_pipe, sample_set, still, tmp_path / "out", tmp_path / "cache", init_lora=model_k)
    _, text = split_init_lora(model_k, SDXL.denoiser, SDXL.text_encoders)
    for name in SDXL.text_encoders:
        started = result.text_encoder_lora_states[name]
        assert set(started) == set(text[name])
        for key, value in text[name].items():
            torch.testing.assert_close(started[key], value.float(), atol=1e-6, rtol=0)


def test_kl_reference_is_model_k_with_its_text_encoders_frozen(fresh_pipe, sample_set, model_k, tmp_path):
    # The U-Net LoRA stays (almost) where model k left it while the text encoders move fast: the KL can only
    # grow through the text side, i.e. only if the reference keeps model k's own text encoders.
    moving_text = dataclasses.replace(TE, steps=3, lr=1e-12, text_encoder_lr=0.2, kl_weight=1.0)
    logs: dict[int, dict] = {}
    during: dict[str, object] = {}

    def on_log(step: int, metrics: dict) -> None:
        logs[step] = metrics
        encoder = fresh_pipe.text_encoder
        during["adapters"] = set(encoder.peft_config)
        during["trainable"] = {n for n, p in encoder.named_parameters() if p.requires_grad}

    train_lora(fresh_pipe, sample_set, moving_text, tmp_path / "out", tmp_path / "cache", on_log=on_log,
               init_lora=model_k)  # fmt: skip
    assert logs[1]["kl"] == 0.0  # before any update the trained model is model k
    assert logs[3]["kl"] > 1e-6
    assert during["adapters"] == {DEFAULT_ADAPTER, REFERENCE_ADAPTER}
    assert during["trainable"] and all(f".{DEFAULT_ADAPTER}." in n for n in during["trainable"])
    for encoder in (fresh_pipe.text_encoder, fresh_pipe.text_encoder_2):
        assert set(encoder.peft_config) == {DEFAULT_ADAPTER}  # the reference is gone after training
