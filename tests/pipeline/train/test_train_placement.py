"""Training moves the VAE and the frozen text encoders off the accelerator; however the run ends, they go back.

On a CPU-only machine nothing really moves, so the test records placements: the offload puts each encoder on the
``meta`` device (recorded, not performed) and every later ``.to(device)`` call is recorded as where it now is.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.train import TrainConfig, train_lora
from pipeline.train.trainer import Trainer

OFFLOADED = torch.device("meta")
CONFIG = TrainConfig(steps=3, resolution=64, rank=4, alpha=4, lr=1e-3, segmix_p=0, prior_weight=0, mixed_precision="no")


@pytest.fixture
def recorded_placements(tiny_pipe, monkeypatch) -> dict[str, torch.device]:
    encoders = {name: getattr(tiny_pipe, name) for name in ("vae", "text_encoder", "text_encoder_2")}
    names = {id(module): name for name, module in encoders.items()}
    placements = {name: torch.device("cpu") for name in encoders}
    real_to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if id(self) in names and isinstance(target, str | torch.device):
            placements[names[id(self)]] = torch.device(target)
            if torch.device(target) == OFFLOADED:
                return self  # recorded only: the weights stay where they are
        return real_to(self, *args, **kwargs)

    def offload_to_meta(self):
        for module in encoders.values():
            module.to(OFFLOADED)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    monkeypatch.setattr(Trainer, "offload_encoders", offload_to_meta)
    return placements


def test_a_failure_mid_training_puts_the_encoders_back(
    tiny_pipe, sample_set, recorded_placements, tmp_path, monkeypatch
):
    offloaded_during_step = {}

    def failing_loss(self, step, batch):
        offloaded_during_step.update(recorded_placements)
        raise RuntimeError("injected failure in step")

    monkeypatch.setattr(Trainer, "loss", failing_loss)
    with pytest.raises(RuntimeError, match="injected failure"):
        train_lora(tiny_pipe, sample_set[:2], CONFIG, tmp_path / "out", tmp_path / "cache")
    assert set(offloaded_during_step.values()) == {OFFLOADED}  # the failure struck while they were away
    assert recorded_placements == {name: torch.device("cpu") for name in recorded_placements}


def test_a_finished_run_puts_the_encoders_back(tiny_pipe, sample_set, recorded_placements, tmp_path):
    train_lora(tiny_pipe, sample_set[:2], CONFIG, tmp_path / "out", tmp_path / "cache")
    assert recorded_placements == {name: torch.device("cpu") for name in recorded_placements}
