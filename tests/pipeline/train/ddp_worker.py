"""One rank of the 2-process DDP test (run by torchrun): trains and saves this rank's final LoRA."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from pipeline.train import TrainConfig, TrainingSample, train_lora


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(job["model_dir"])  # the folder's own class: SDXL or FLUX.1
    pipe.set_progress_bar_config(disable=True)
    samples = [TrainingSample(**s) for s in job["samples"]]
    out = Path(job["out_dir"])
    result = train_lora(pipe, samples, TrainConfig(**job["config"]), out, Path(job["cache_dir"]))
    rank = int(os.environ["RANK"])
    save_file(result.lora_state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"metrics": result.metrics, "losses": result.losses}, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
