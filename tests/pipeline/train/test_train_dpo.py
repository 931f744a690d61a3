"""Diffusion-DPO on (winner, loser) pairs: log 2 at parity, learns the preference, validates pairs, resumes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.errors import CastloraError, CheckpointError
from pipeline.lora.adapters import DEFAULT_ADAPTER
from pipeline.train import TrainConfig, TrainingSample, train_lora, train_preference
from pipeline.train.checkpoint import list_checkpoints
from pipeline.train.preference import diffusion_dpo_loss, implicit_accuracy
from tests.pipeline.train.conftest import write_image

# LoRA on the resnet convs too: the random tiny U-Net's attention barely steers its output (see test_train_loss).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
DPO = TrainConfig(
    steps=12,
    resolution=64,
    mixed_precision="no",
    rank=4,
    alpha=4,
    lr=1e-2,
    prior_weight=0,
    segmix_p=0,
    dpo_beta=5000.0,
    batch_size=2,
    log_every=1,
    checkpoint_every=4,
    targets=TARGETS,
)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[TrainingSample, TrainingSample]]:
    """Two prompts, each with a striped winner and a flat loser of different colours."""
    folder = tmp_path_factory.mktemp("dpo_images")
    specs = [
        ("a photo of olis dog", (220, 60, 60), (60, 60, 220)),
        ("olis dog and vrin dog", (60, 200, 60), (200, 200, 200)),
    ]
    made = []
    for index, (prompt, win_colour, lose_colour) in enumerate(specs):
        win_path, lose_path = folder / f"{index}_w.png", folder / f"{index}_l.png"
        winner = TrainingSample(write_image(win_path, win_colour, stripes=True), str(win_path), prompt, "instance")
        loser = TrainingSample(write_image(lose_path, lose_colour), str(lose_path), prompt, "instance")
        made.append((winner, loser))
    return made


@pytest.fixture(scope="module")
def init_lora(tiny_pipe, pairs, tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("dpo_round0")
    config = TrainConfig(
        steps=2,
        resolution=64,
        mixed_precision="no",
        rank=4,
        alpha=4,
        lr=1e-2,
        prior_weight=0,
        segmix_p=0,
        targets=TARGETS,
    )  # generated images only: no Seg-Mix bank
    samples = [s for pair in pairs for s in pair]
    return train_lora(tiny_pipe, samples, config, root / "out", root / "cache").lora_state


@pytest.fixture(scope="module")
def dpo_run(tiny_pipe, pairs, init_lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    logs: dict[int, dict] = {}
    result = train_preference(
        tiny_pipe, pairs, DPO, root / "out", root / "cache", init_lora, on_log=lambda s, m: logs.update({s: m})
    )
    return result, logs, root


def test_loss_is_log2_while_model_equals_reference(dpo_run):
    _, logs, _ = dpo_run
    assert logs[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[1]["implicit_acc"] == 0.5  # every margin is exactly 0


def test_dpo_learns_the_preference_on_its_pairs(dpo_run, tiny_pipe):
    result, _, _ = dpo_run
    # Per-step losses jump with the random timestep; the end-of-run evaluation scores every pair at fixed noise.
    assert result.metrics["dpo_eval_loss"] < 0.5 * math.log(2)
    assert result.metrics["implicit_accuracy"] > 0.5
    assert result.metrics["preference_pairs"] == 2
    assert set(tiny_pipe.unet.peft_config) == {DEFAULT_ADAPTER}  # reference removed


def test_dpo_resumes_onto_the_uninterrupted_trajectory(tiny_pipe, pairs, init_lora, dpo_run, tmp_path):
    _, _, root = dpo_run
    config = dataclasses.replace(DPO, steps=6)
    full = train_preference(tiny_pipe, pairs, config, tmp_path / "full", root / "cache", init_lora)

    def kill_at_five(step: int, metrics: dict) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_preference(tiny_pipe, pairs, config, tmp_path / "out", root / "cache", init_lora, on_log=kill_at_five)
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [4]
    resumed = train_preference(tiny_pipe, pairs[::-1], config, tmp_path / "out", root / "cache", init_lora)
    assert resumed.resumed_from == 4 and resumed.losses == full.losses
    for key, value in full.lora_state.items():
        assert torch.equal(resumed.lora_state[key], value), key
    assert resumed.metrics["implicit_accuracy"] == full.metrics["implicit_accuracy"]


def test_plain_and_dpo_checkpoints_do_not_mix(tiny_pipe, pairs, init_lora, dpo_run):
    _, _, root = dpo_run
    samples = [s for pair in pairs for s in pair]
    with pytest.raises(CheckpointError, match="objective"):
        train_lora(tiny_pipe, samples, DPO, root / "out", root / "cache", init_lora=init_lora)


def test_pair_with_different_prompts_is_refused(tiny_pipe, pairs, tmp_path):
    winner, loser = pairs[0]
    mixed = [(winner, dataclasses.replace(loser, prompt="a photo of vrin dog"))]
    with pytest.raises(CastloraError, match=r"pair 0.*same prompt"):
        train_preference(tiny_pipe, mixed, DPO, tmp_path / "out", tmp_path / "cache", None)
    with pytest.raises(CastloraError, match="same image"):
        train_preference(tiny_pipe, [(winner, winner)], DPO, tmp_path / "out", tmp_path / "cache", None)


def test_config_without_beta_or_with_prior_is_refused(tiny_pipe, pairs, tmp_path):
    bad = dataclasses.replace(DPO, dpo_beta=0.0, prior_weight=1.0)
    with pytest.raises(CastloraError, match=r"dpo_beta > 0.*prior_weight=0"):
        train_preference(tiny_pipe, pairs, bad, tmp_path / "out", tmp_path / "cache", None)


def test_dpo_loss_and_accuracy_follow_the_margin_sign():
    # Pair 0: the model lowered the winner's error vs the reference (good); pair 1: it lowered the loser's.
    model = torch.tensor([0.9, 1.0, 1.0, 0.9])  # winners (0.9, 1.0), losers (1.0, 0.9)
    reference = torch.ones(4)
    loss, margins = diffusion_dpo_loss(model, reference, beta=10.0)
    assert margins.tolist() == pytest.approx([0.5, -0.5])
    assert implicit_accuracy(margins).item() == pytest.approx(0.5)
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert loss.item() == pytest.approx(expected)
    same, zero = diffusion_dpo_loss(reference, reference, beta=10.0)
    assert same.item() == pytest.approx(math.log(2)) and implicit_accuracy(zero).item() == 0.5
