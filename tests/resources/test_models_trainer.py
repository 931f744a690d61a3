"""ModelResource.trainer: in-process train_lora for one process, the accelerate launcher for more."""

from __future__ import annotations

import re

import pytest
import torch

from assets.definitions import build_resources
from pipeline.errors import CastloraError
from pipeline.train import train_lora
from resources import ModelResource


def test_one_process_trains_in_process(tmp_path):
    assert ModelResource().trainer(tmp_path) is train_lora


def test_several_processes_get_the_launcher(tmp_path):
    trainer = ModelResource(train_processes=2, device="cpu").trainer(tmp_path)
    assert trainer is not train_lora
    assert trainer.__module__ == "pipeline.train.launch"


def test_bad_process_count_and_config_file_are_named(tmp_path):
    with pytest.raises(CastloraError, match=r"num_processes=0 .*train_processes"):
        ModelResource(train_processes=0, device="cpu").trainer(tmp_path)
    missing = tmp_path / "accelerate.yaml"
    with pytest.raises(CastloraError, match=re.escape(f"accelerate_config_file {missing}")):
        ModelResource(train_processes=2, device="cpu", accelerate_config_file=str(missing)).trainer(tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="needs fewer than 4 GPUs")
def test_more_processes_than_gpus_is_refused_on_cuda(tmp_path):
    with pytest.raises(CastloraError, match=r"num_processes=4 .*visible CUDA GPU"):
        ModelResource(train_processes=4, device="cuda").trainer(tmp_path)


def test_train_processes_from_the_environment():
    assert build_resources({"CASTLORA_TRAIN_PROCESSES": "2"})["models"].train_processes == 2
    assert build_resources({})["models"].train_processes == 1
    with pytest.raises(CastloraError, match="CASTLORA_TRAIN_PROCESSES must be a whole number"):
        build_resources({"CASTLORA_TRAIN_PROCESSES": "two"})
