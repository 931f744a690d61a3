"""Multi-process training through ``accelerate launch``: the command, its checks, and a 2-rank CPU run."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import CastloraError
from pipeline.lora.adapters import unet_lora_state_dict
from pipeline.lora.record import CURRENT_FILE
from pipeline.lora.versions import TrainingRun
from pipeline.stages.lora import ValidationRenders, run_lora
from pipeline.storage.lineage import LineageRecorder
from pipeline.train import TrainConfig
from pipeline.train.launch import LaunchSettings, distributed_trainer, launch_command, launch_env

CONFIG = TrainConfig(
    steps=3,
    resolution=64,
    mixed_precision="no",
    rank=4,
    alpha=4,
    lr=1e-3,
    checkpoint_every=2,
    segmix_p=0.5,
    log_every=1,
)


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_cpu_command_launches_the_worker_on_every_process(tmp_path):
    command = launch_command(LaunchSettings(num_processes=2, main_process_port=29612, use_cpu=True), tmp_path / "j")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert _flag(command, "--num_processes") == "2"
    assert _flag(command, "--num_machines") == "1"
    assert _flag(command, "--main_process_ip") == "127.0.0.1"
    assert _flag(command, "--main_process_port") == "29612"
    # `--cpu` would make accelerate start a single process: several CPU ranks go through --multi_gpu (gloo).
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[-3:] == ["-m", "pipeline.train.worker", str(tmp_path / "j")]
    assert "--config_file" not in command


def test_single_cpu_process_uses_cpu_flag_and_a_free_port(tmp_path):
    command = launch_command(LaunchSettings(num_processes=1, use_cpu=True), tmp_path / "j")
    assert "--cpu" in command and "--multi_gpu" not in command
    assert 0 < int(_flag(command, "--main_process_port")) < 65536


def test_cuda_command_with_a_config_file(tmp_path):
    config_file = tmp_path / "accelerate.yaml"
    config_file.write_text("compute_environment: LOCAL_MACHINE\n")
    settings = LaunchSettings(num_processes=4, accelerate_config_file=str(config_file), use_cpu=False)
    command = launch_command(settings, tmp_path / "j", gpu_count=4)
    assert "--multi_gpu" in command and "--cpu" not in command
    assert _flag(command, "--config_file") == str(config_file)
    assert _flag(command, "--num_processes") == "4"
    assert "CUDA_VISIBLE_DEVICES" not in launch_env(settings, {})
    assert launch_env(LaunchSettings(num_processes=2, use_cpu=True), {})["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    ("settings", "gpus", "message"),
    [
        (LaunchSettings(num_processes=0, use_cpu=True), 0, "num_processes=0"),
        (LaunchSettings(num_processes=3, use_cpu=False), 2, "more than the 2 visible CUDA GPU"),
        (LaunchSettings(num_processes=2, use_cpu=True, accelerate_config_file="/nowhere/acc.yaml"), 0, "/nowhere"),
        (LaunchSettings(num_processes=2, use_cpu=True, main_process_port=70000), 0, "main_process_port=70000"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, gpus, message, tmp_path):
    with pytest.raises(CastloraError, match=message):
        launch_command(settings, tmp_path / "job.json", gpu_count=gpus)


@pytest.fixture()
def two_ranks_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_two_cpu_ranks_train_the_lora_run_lora_exports(tiny_sdxl_dir, tiny_pipe, sample_set, tmp_path, two_ranks_env):
    settings = LaunchSettings(num_processes=2, use_cpu=True)
    trainer = distributed_trainer(settings, tiny_sdxl_dir, work_dir=tmp_path / "job")
    recorder = LineageRecorder(tmp_path / "lineage", "run", "lora", "olis__vrin", "test")
    logged: list[int] = []
    started = time.perf_counter()
    out = run_lora(
        pipe=tiny_pipe,
        samples=sample_set,
        config=CONFIG,
        run=TrainingRun(
            tmp_path / "lora", tmp_path / "cache", recorder, "tiny-sdxl", lambda step, metrics: logged.append(step)
        ),
        validation=ValidationRenders(prompts=["olis dog"], steps=2),
        trainer=trainer,
    )
    print(f"2-rank run_lora: {time.perf_counter() - started:.1f}s")

    assert out.files["diffusers"].is_file() and out.files["kohya"].is_file()
    assert (tmp_path / "lora" / CURRENT_FILE).is_file()
    assert len(out.validation) == 1
    assert logged == [1, 2, 3]  # rank 0's on_log calls relayed from the subprocess
    assert out.result.steps_done == 3 and out.result.metrics["world_size"] == 2
    assert list((out.folder / "checkpoints").iterdir())  # train_lora's checkpoints, in the version folder

    rank0 = load_file(str(tmp_path / "job" / "result" / "lora_state.safetensors"))
    exported = load_file(str(out.files["diffusers"]))
    assert set(rank0) == {k for k in exported if k.startswith("unet.")}
    for key, value in rank0.items():
        assert torch.equal(exported[key].float(), value), key
    assert out.result.lora_state.keys() == rank0.keys()
    # Trained, not the fresh adapter: its up (B) matrices start at zero.
    assert any(value.abs().sum() > 0 for key, value in rank0.items() if ".up." in key)
    in_pipe = unet_lora_state_dict(tiny_pipe.unet)
    assert all(torch.equal(in_pipe[k].float().cpu(), rank0[k]) for k in rank0)


@pytest.mark.slow
def test_a_failing_worker_gives_a_clear_error(tiny_pipe, sample_set, tmp_path, two_ranks_env):
    missing = tmp_path / "no_such_model"
    trainer = distributed_trainer(LaunchSettings(num_processes=2, use_cpu=True), missing)
    with pytest.raises(CastloraError) as caught:
        trainer(tiny_pipe, sample_set, CONFIG, tmp_path / "out", tmp_path / "cache")
    message = str(caught.value)
    assert "Distributed LoRA training failed" in message
    assert f"model directory {missing} does not exist" in message
    assert "pipeline.train.worker" in message  # the command is shown
    assert not (tmp_path / "out" / "checkpoints").exists()
