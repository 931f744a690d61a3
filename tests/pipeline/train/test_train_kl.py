"""Continuing from a previous LoRA (init_lora) and MuDI's KL term towards it (a frozen "reference" adapter)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import CastloraError, CheckpointError
from pipeline.lora.adapters import DEFAULT_ADAPTER, LoraError, unet_lora_state_dict
from pipeline.lora.training import REFERENCE_ADAPTER
from pipeline.train import TrainConfig, train_lora
from pipeline.train.checkpoint import LORA_FILE, OPTIMIZER_FILE, list_checkpoints
from pipeline.train.losses import kl_to_reference

BASE = TrainConfig(
    steps=3, resolution=64, mixed_precision="no", rank=4, alpha=4, lr=1e-2, prior_weight=0, log_every=1, segmix_p=0.5
)
KL = dataclasses.replace(BASE, steps=4, kl_weight=1.0, checkpoint_every=2)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def init_lora(tiny_pipe, sample_set, tmp_path_factory) -> dict[str, torch.Tensor]:
    """A "round k-1" LoRA whose up (B) matrices are non-zero, so it differs from a fresh adapter."""
    root = tmp_path_factory.mktemp("round0")
    state = train_lora(tiny_pipe, sample_set, BASE, root / "out", root / "cache").lora_state
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".up." in k)
    return state


@pytest.fixture(scope="module")
def kl_run(tiny_pipe, sample_set, init_lora, tmp_path_factory):
    """An uninterrupted KL run; ``on_log`` records what the U-Net looks like while the reference is attached."""
    root = tmp_path_factory.mktemp("kl")
    logs: dict[int, dict] = {}
    during: dict[str, object] = {}

    def on_log(step: int, metrics: dict) -> None:
        logs[step] = metrics
        unet = tiny_pipe.unet
        during["adapters"] = set(unet.peft_config)
        during["trainable"] = {n for n, p in unet.named_parameters() if p.requires_grad}
        during["lora_params"] = {n for n, _ in unet.named_parameters() if f"lora_B.{DEFAULT_ADAPTER}." in n}
        during["exported"] = set(unet_lora_state_dict(unet, DEFAULT_ADAPTER))

    result = train_lora(tiny_pipe, sample_set, KL, root / "out", root / "cache", on_log=on_log, init_lora=init_lora)
    return result, logs, during, root


def test_kl_is_zero_while_the_models_are_equal_then_grows(kl_run):
    _, logs, _, _ = kl_run
    assert logs[1]["kl"] == 0.0  # step 1 runs before any update: trained adapter == reference adapter
    assert all(logs[step]["kl"] > 0 for step in (2, 3, 4))
    # The KL is part of the logged loss: loss = instance mse + kl_weight * kl (no prior here).
    assert logs[3]["loss"] == pytest.approx(logs[3]["instance_mse"] + logs[3]["kl"], rel=1e-5)


def test_only_the_trained_adapter_requires_grad_and_is_saved(kl_run, init_lora):
    result, _, during, root = kl_run
    assert during["adapters"] == {DEFAULT_ADAPTER, REFERENCE_ADAPTER}
    trainable = during["trainable"]
    assert trainable and all(f".{DEFAULT_ADAPTER}." in name for name in trainable)
    assert {n for n in trainable if "lora_B" in n} == during["lora_params"]
    assert during["exported"] == set(init_lora)  # export of the trained adapter: no reference keys
    assert set(result.lora_state) == set(init_lora)
    assert not any(REFERENCE_ADAPTER in key for key in result.lora_state)
    _, folder = list_checkpoints(root / "out")[-1]
    saved = load_file(str(folder / LORA_FILE))
    assert saved and all(f".{DEFAULT_ADAPTER}." in key for key in saved)
    optimizer = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    assert len(optimizer["param_groups"][0]["params"]) == len(saved)  # the optimizer holds exactly those


def test_reference_adapter_is_removed_after_training(kl_run, tiny_pipe):
    assert set(tiny_pipe.unet.peft_config) == {DEFAULT_ADAPTER}
    trainable = {n for n, p in tiny_pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all(f".{DEFAULT_ADAPTER}." in n for n in trainable)


def test_training_starts_from_init_lora(tiny_pipe, sample_set, init_lora, tmp_path):
    barely = dataclasses.replace(BASE, steps=1, lr=1e-12)
    result = train_lora(tiny_pipe, sample_set, barely, tmp_path / "out", tmp_path / "cache", init_lora=init_lora)
    assert set(result.lora_state) == set(init_lora)
    for key, value in init_lora.items():
        assert torch.allclose(result.lora_state[key], value, atol=1e-7), key


def test_kl_run_resumes_onto_the_uninterrupted_trajectory(tiny_pipe, sample_set, init_lora, kl_run, tmp_path):
    expected, _, _, root = kl_run

    def kill_at_three(step: int, metrics: dict) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_lora(
            tiny_pipe, sample_set, KL, tmp_path / "out", root / "cache", on_log=kill_at_three, init_lora=init_lora
        )
    assert set(tiny_pipe.unet.peft_config) == {DEFAULT_ADAPTER}  # cleaned up even when the run dies
    resumed = train_lora(tiny_pipe, sample_set, KL, tmp_path / "out", root / "cache", init_lora=init_lora)
    assert resumed.resumed_from == 2
    assert resumed.losses == expected.losses
    for key, value in expected.lora_state.items():
        assert torch.equal(resumed.lora_state[key], value), key


def test_checkpoint_from_another_init_lora_is_refused(tiny_pipe, sample_set, init_lora, kl_run):
    _, _, _, root = kl_run
    other = {key: value * 2 for key, value in init_lora.items()}
    with pytest.raises(CheckpointError, match="init_lora"):
        train_lora(tiny_pipe, sample_set, KL, root / "out", root / "cache", init_lora=other)
    with pytest.raises(CheckpointError, match="init_lora"):  # nor from a fresh start without KL
        train_lora(tiny_pipe, sample_set, dataclasses.replace(KL, kl_weight=0.0), root / "out", root / "cache")


def test_mismatched_rank_or_targets_are_refused(tiny_pipe, sample_set, init_lora, tmp_path):
    with pytest.raises(LoraError, match="rank"):
        train_lora(
            tiny_pipe,
            sample_set,
            dataclasses.replace(BASE, rank=8),
            tmp_path / "a",
            tmp_path / "c",
            init_lora=init_lora,
        )
    fewer = dataclasses.replace(BASE, targets=("to_q", "to_k"))
    with pytest.raises(LoraError, match="targets"):
        train_lora(tiny_pipe, sample_set, fewer, tmp_path / "b", tmp_path / "c", init_lora=init_lora)


def test_kl_without_init_lora_is_refused(tiny_pipe, sample_set, tmp_path):
    with pytest.raises(CastloraError, match="init_lora"):
        train_lora(tiny_pipe, sample_set, KL, tmp_path / "out", tmp_path / "cache")


def test_kl_to_reference_is_the_mean_squared_difference():
    a, b = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    b[0] = 2.0  # sample 0 differs by 2 everywhere (squared 4), sample 1 not at all
    assert kl_to_reference(a, b).item() == pytest.approx(2.0)
    assert kl_to_reference(a, a).item() == 0.0
