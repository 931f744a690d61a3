"""``compile_unet``: the compiled training step trains the same LoRA as eager, leaves the pipeline's U-Net
uncompiled, does not change a run's fingerprint, and a CPU without a C++ compiler gets a clear error.

The compile tests use the ``aot_eager`` backend: the same Dynamo graph capture and AOTAutograd forward/backward
split as inductor, without inductor's C++ build (minutes on a 2-core CPU; the benchmark runs inductor itself).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from pipeline.errors import CastloraError
from pipeline.train import TrainConfig, train_lora
from pipeline.train import runtime as train_runtime

RES = 64


def _config(**overrides) -> TrainConfig:
    base = {
        "steps": 3,
        "resolution": RES,
        "mixed_precision": "no",
        "rank": 4,
        "alpha": 4,
        "prior_weight": 0,
        "segmix_p": 0,
        "lr": 1e-3,
    }
    return TrainConfig(**{**base, **overrides})


def test_compiled_step_trains_the_same_lora_as_eager(tiny_pipe, sample_set, tmp_path, monkeypatch):
    monkeypatch.setattr(train_runtime, "COMPILE_BACKEND", "aot_eager")
    instance = [s for s in sample_set if s.kind == "instance"]
    eager = train_lora(tiny_pipe, instance, _config(), tmp_path / "eager", tmp_path / "cache")
    torch._dynamo.reset()
    counters.clear()
    compiled = train_lora(tiny_pipe, instance, _config(compile_unet=True), tmp_path / "compiled", tmp_path / "cache")

    assert counters["stats"]["unique_graphs"] >= 1, "the training forward was not captured by torch.compile"
    assert compiled.lora_state.keys() == eager.lora_state.keys()
    for key, value in eager.lora_state.items():
        # Adam turns float-rounding differences of near-zero gradients into ~1e-6 weight differences after three
        # steps of lr 1e-3 (updates ~1e-3); a wrong graph would differ by the updates themselves.
        torch.testing.assert_close(compiled.lora_state[key], value, rtol=1e-3, atol=2e-5, msg=key)
    assert any(value.abs().max() > 0 for key, value in eager.lora_state.items() if "lora.up" in key)
    # Generation afterwards runs the plain module: nothing compiled stays attached to the pipeline.
    assert type(tiny_pipe.unet).__name__ == "UNet2DConditionModel"
    assert getattr(tiny_pipe.unet, "_compiled_call_impl", None) is None


def test_compile_does_not_change_the_run_fingerprint():
    assert _config(compile_unet=True).result_fields() == _config().result_fields()


def test_cpu_compile_without_a_cxx_compiler_is_a_clear_error(tiny_pipe, sample_set, tmp_path, monkeypatch):
    monkeypatch.setattr(train_runtime, "COMPILE_BACKEND", "inductor")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(train_runtime.shutil, "which", lambda name: None)
    instance = [s for s in sample_set if s.kind == "instance"]
    with pytest.raises(CastloraError, match=r"C\+\+ compiler.*compile_unet=False"):
        train_lora(tiny_pipe, instance, _config(compile_unet=True), tmp_path / "out", tmp_path / "cache")
