"""A FLUX.1 training run with every data feature on (Seg-Mix with probability p, prior preservation with prior
composites, masked loss): an interrupted run resumes onto exactly the uninterrupted trajectory, and two CPU
processes (gloo, DDP) end with the same LoRA, as for SDXL (docs/design.md#checkpoints-and-resume,
docs/design.md#multi-process-training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.families import load_base_pipeline
from pipeline.models.base_model import BaseModelSpec
from pipeline.models.loading import ensure_tiny
from pipeline.models.presets import get_preset
from pipeline.train import TrainConfig, train_lora
from pipeline.train.checkpoint import list_checkpoints
from tests.pipeline.train.conftest import sample_set  # noqa: F401 (fixture: instance, Seg-Mix and prior images)
from tests.pipeline.train.test_train_ddp import train_two_ranks

CONFIG = TrainConfig(
    steps=4,
    resolution=64,
    mixed_precision="no",
    rank=4,
    alpha=4,
    lr=1e-3,
    checkpoint_every=2,
    log_every=1,
    segmix_p=0.5,
    prior_weight=1.0,
    masked_loss=True,
)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return ensure_tiny("flux", tmp_path_factory.mktemp("flux_models"))


@pytest.fixture(scope="module")
def pipe(flux_dir, one_thread):
    preset = get_preset("tiny-flux")
    return load_base_pipeline(BaseModelSpec(source=str(flux_dir), family=preset.family), flux_dir.parent)


@pytest.fixture(scope="module")
def uninterrupted(pipe, sample_set, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("flux_full")
    return train_lora(pipe, sample_set, CONFIG, root / "out", root / "cache"), root


def test_every_data_feature_trains_on_flux(uninterrupted, sample_set):  # noqa: F811
    result, _ = uninterrupted
    kinds = {s.kind for s in sample_set}
    assert {"instance", "segmix", "prior", "prior_segmix"} <= kinds
    assert result.steps_done == 4 and all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in result.losses)
    assert any(v.abs().sum() > 0 for k, v in result.lora_state.items() if "lora_B" in k or ".up." in k)


def test_flux_resume_after_kill_equals_uninterrupted(pipe, sample_set, uninterrupted, tmp_path):  # noqa: F811
    expected, root = uninterrupted

    def kill_at_3(done: int, metrics: dict) -> None:
        if done == 3:
            raise Killed("killed after step 3")

    with pytest.raises(Killed):
        train_lora(pipe, sample_set, CONFIG, tmp_path / "out", root / "cache", on_log=kill_at_3)
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [2]
    resumed = train_lora(pipe, sample_set, CONFIG, tmp_path / "out", root / "cache")
    assert resumed.resumed_from == 2 and resumed.steps_done == 4
    assert resumed.lora_state.keys() == expected.lora_state.keys()
    for key, value in expected.lora_state.items():
        assert torch.equal(resumed.lora_state[key], value), key
    assert resumed.losses == expected.losses


def test_two_flux_ranks_agree_on_the_final_lora(flux_dir, pipe, sample_set, uninterrupted, tmp_path):  # noqa: F811
    rank0, rank1, out = train_two_ranks(flux_dir, sample_set, CONFIG, tmp_path, timeout_s=600)
    assert rank0.keys() == rank1.keys() and any(k.startswith("transformer") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert json.loads((out / "rank0.json").read_text())["metrics"]["world_size"] == 2
    # One process sees only rank 0's half of each global batch: its LoRA differs from DDP's.
    single, _ = uninterrupted
    assert any(not torch.allclose(single.lora_state[k], rank0[k]) for k in rank0)
