"""Checkpoints: an interrupted run resumes onto exactly the uninterrupted trajectory; bad ones are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.train import TrainConfig, train_lora
from pipeline.train.checkpoint import LORA_FILE, list_checkpoints

CONFIG = TrainConfig(
    steps=6,
    resolution=64,
    mixed_precision="no",
    rank=4,
    alpha=4,
    lr=1e-3,
    checkpoint_every=2,
    log_every=1,
    segmix_p=0.5,
)


class Killed(Exception):
    pass


def kill_at(step: int):
    def on_log(done: int, metrics: dict) -> None:
        if done == step:
            raise Killed(f"killed after step {done}")

    return on_log


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipe, sample_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return train_lora(tiny_pipe, sample_set, CONFIG, root / "out", root / "cache"), root


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_uninterrupted_run_trains_and_keeps_newest_checkpoints(uninterrupted):
    result, root = uninterrupted
    assert result.steps_done == 6 and result.resumed_from is None
    assert [s for s, _, _ in result.losses] == list(range(1, 7))
    assert any(v.abs().sum() > 0 for k, v in result.lora_state.items() if ".up." in k)  # B moved from zero
    assert [step for step, _ in list_checkpoints(root / "out")] == [4, 6]  # keep_checkpoints=2


def test_resume_after_kill_equals_uninterrupted(tiny_pipe, sample_set, uninterrupted, tmp_path):
    expected, root = uninterrupted
    with pytest.raises(Killed):  # dies after step 3: the newest checkpoint is step 2, step 3 is replayed
        train_lora(tiny_pipe, sample_set, CONFIG, tmp_path / "out", root / "cache", on_log=kill_at(3))
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [2]
    resumed = train_lora(tiny_pipe, sample_set, CONFIG, tmp_path / "out", root / "cache")
    assert resumed.resumed_from == 2 and resumed.steps_done == 6
    assert resumed.metrics["steps_this_run"] == 4
    assert_same_lora(resumed.lora_state, expected.lora_state)
    assert resumed.losses == expected.losses


def test_stop_request_checkpoints_then_resumes_exactly(tiny_pipe, sample_set, uninterrupted, tmp_path):
    expected, root = uninterrupted
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) >= 3

    stopped = train_lora(tiny_pipe, sample_set, CONFIG, tmp_path / "out", root / "cache", should_stop=stop_after_three)
    assert stopped.steps_done == 3
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [2, 3]
    resumed = train_lora(tiny_pipe, sample_set, CONFIG, tmp_path / "out", root / "cache")
    assert resumed.resumed_from == 3
    assert_same_lora(resumed.lora_state, expected.lora_state)


def test_finished_run_is_not_retrained(tiny_pipe, sample_set, uninterrupted):
    expected, root = uninterrupted
    again = train_lora(tiny_pipe, sample_set, CONFIG, root / "out", root / "cache")
    assert again.resumed_from == 6 and again.metrics["steps_this_run"] == 0
    assert_same_lora(again.lora_state, expected.lora_state)
    assert again.losses == expected.losses


def test_corrupt_checkpoint_is_refused_naming_the_folder(tiny_pipe, sample_set, tmp_path):
    config = dataclasses.replace(CONFIG, steps=2)
    train_lora(tiny_pipe, sample_set, config, tmp_path / "out", tmp_path / "cache")
    ((_, folder),) = list_checkpoints(tmp_path / "out")
    lora_file = folder / LORA_FILE
    data = bytearray(lora_file.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    lora_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{folder.name}.*{LORA_FILE} is corrupt"):
        train_lora(tiny_pipe, sample_set, config, tmp_path / "out", tmp_path / "cache")


def test_unreadable_meta_is_refused(tiny_pipe, sample_set, tmp_path):
    config = dataclasses.replace(CONFIG, steps=2)
    train_lora(tiny_pipe, sample_set, config, tmp_path / "out", tmp_path / "cache")
    ((_, folder),) = list_checkpoints(tmp_path / "out")
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta\.json is missing or unreadable"):
        train_lora(tiny_pipe, sample_set, config, tmp_path / "out", tmp_path / "cache")


@pytest.mark.parametrize(("field", "value"), [("rank", 8), ("lr", 5e-4), ("segmix_p", 0.1)])
def test_mismatched_config_is_refused_naming_the_field(tiny_pipe, sample_set, uninterrupted, field, value):
    _, root = uninterrupted
    changed = dataclasses.replace(CONFIG, **{field: value})
    with pytest.raises(CheckpointError, match=f"different training setup.*{field}") as info:
        train_lora(tiny_pipe, sample_set, changed, root / "out", root / "cache")
    assert "step-000006" in str(info.value)


def test_changed_samples_are_refused(tiny_pipe, sample_set, uninterrupted):
    _, root = uninterrupted
    fewer = [s for s in sample_set if s.kind != "prior_segmix"]
    with pytest.raises(CheckpointError, match="samples"):
        train_lora(tiny_pipe, fewer, CONFIG, root / "out", root / "cache")


def test_bookkeeping_fields_may_change_between_runs(tiny_pipe, sample_set, uninterrupted):
    _, root = uninterrupted
    relaxed = dataclasses.replace(CONFIG, log_every=5, checkpoint_every=3)
    assert train_lora(tiny_pipe, sample_set, relaxed, root / "out", root / "cache").resumed_from == 6


def test_meta_records_file_hashes_and_fingerprint(uninterrupted):
    _, root = uninterrupted
    _, folder = list_checkpoints(root / "out")[-1]
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == {"lora.safetensors", "optimizer.pt", "trainer_state.pt"}
    assert meta["fingerprint_fields"]["config"]["rank"] == 4
    assert len(meta["fingerprint"]) == 64


def test_gradient_checkpointing_does_not_change_the_result(tiny_pipe, sample_set, tmp_path):
    """It is left out of the fingerprint, so it must not change the weights."""
    config = dataclasses.replace(CONFIG, steps=2)
    plain = train_lora(tiny_pipe, sample_set, config, tmp_path / "plain", tmp_path / "cache")
    checkpointed = dataclasses.replace(config, gradient_checkpointing=True)
    recomputed = train_lora(tiny_pipe, sample_set, checkpointed, tmp_path / "gc", tmp_path / "cache")
    assert tiny_pipe.unet.is_gradient_checkpointing
    for key, value in plain.lora_state.items():
        assert torch.allclose(value, recomputed.lora_state[key], atol=1e-6), key
    train_lora(tiny_pipe, sample_set, config, tmp_path / "plain2", tmp_path / "cache")
    assert not tiny_pipe.unet.is_gradient_checkpointing
