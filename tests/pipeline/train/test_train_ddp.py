"""Two CPU processes (gloo) under accelerate/DDP end with the same LoRA, and it differs from one process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.train import TrainConfig, train_lora

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[3]
CONFIG = TrainConfig(
    steps=3, resolution=64, mixed_precision="no", rank=4, alpha=4, lr=1e-3, checkpoint_every=3, segmix_p=0.5
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_two_ranks(
    model_dir: Path, samples, config: TrainConfig, tmp_path: Path, timeout_s: int
) -> tuple[dict, dict, Path]:
    """Train with two CPU processes (torchrun, gloo) on ``model_dir``; returns rank 0's and rank 1's final LoRA
    and the output folder (``rank<k>.json`` holds each rank's metrics)."""
    job = {
        "model_dir": str(model_dir),
        "samples": [dataclasses.asdict(s) for s in samples],
        "config": dataclasses.asdict(config),
        "out_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER),
        str(job_file),
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "out"
    return load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors")), out


def test_two_ranks_agree_on_the_final_lora(tiny_sdxl_dir, tiny_pipe, sample_set, tmp_path):
    rank0, rank1, out = train_two_ranks(tiny_sdxl_dir, sample_set, CONFIG, tmp_path, timeout_s=300)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert json.loads((out / "rank0.json").read_text())["metrics"]["world_size"] == 2
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if ".up." in k)

    # A single process sees only rank 0's half of each global batch: its LoRA must differ from DDP's.
    single = train_lora(tiny_pipe, sample_set, CONFIG, tmp_path / "single", tmp_path / "cache")
    assert any(not torch.allclose(single.lora_state[k], rank0[k]) for k in rank0)
