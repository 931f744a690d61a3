"""One rank of a distributed ``train_lora`` run, started by ``accelerate launch -m pipeline.train.worker JOB``.

Every rank loads its own copy of the base model (on its own GPU, or the CPU) and trains under DDP; checkpoints
and resume are ``train_lora``'s. Only the main process writes the results (``pipeline.train.launch`` names
the files), each atomically, ``result.json`` last.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import CastloraError
from pipeline.families import family_for, load_base_pipeline
from pipeline.lora.training import ADAPTER_NAME
from pipeline.models.base_model import BaseModelSpec
from pipeline.storage.atomic import atomic_path, write_json_atomic
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainingSample
from pipeline.train.launch import ADAPTER_FILE, ERROR_PREFIX, LOG_PREFIX, LORA_STATE_FILE, RESULT_FILE
from pipeline.train.loop import TrainResult, train_lora


def _rank_device() -> str:
    # Under --multi_gpu every rank sees all GPUs and uses the one of its local rank (as the Accelerator does).
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _print_log(step: int, metrics: dict[str, Any]) -> None:
    print(LOG_PREFIX + json.dumps({"step": step, "metrics": metrics}, default=float), flush=True)


def _adapter_tensors(pipe: Any, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The trained adapter's tensors by ``<component>.<parameter name>`` (what the parent loads back)."""
    components = family_for(pipe).lora_components(pipe, config.train_text_encoder)
    marker = f".{ADAPTER_NAME}."
    return {
        f"{component}.{name}": param.detach().float().cpu().contiguous()
        for component, model in components.items()
        for name, param in model.named_parameters()
        if "lora_" in name and marker in name
    }


def _save_tensors(tensors: dict[str, torch.Tensor], target: Path) -> None:
    with atomic_path(target) as temporary:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(temporary))


def write_result(pipe: Any, config: TrainConfig, result: TrainResult, result_dir: Path) -> None:
    result_dir.mkdir(parents=True, exist_ok=True)
    _save_tensors(_adapter_tensors(pipe, config), result_dir / ADAPTER_FILE)
    _save_tensors(result.lora_state, result_dir / LORA_STATE_FILE)
    fields = {
        "steps_done": result.steps_done,
        "final_loss": result.final_loss,
        "losses": result.losses,
        "resumed_from": result.resumed_from,
        "metrics": result.metrics,
    }
    write_json_atomic(fields, result_dir / RESULT_FILE)  # last: its presence means the files above are whole


def run_job(job_file: Path) -> None:
    job = json.loads(Path(job_file).read_text())
    spec = replace(BaseModelSpec(**job["model"]), device=_rank_device())
    pipe = load_base_pipeline(spec, Path(job["model_cache"]))
    config = TrainConfig(**{**job["config"], "targets": tuple(job["config"]["targets"])})
    samples = [TrainingSample(**sample) for sample in job["samples"]]
    init_lora = load_file(job["init_lora"]) if job.get("init_lora") else None
    result = train_lora(
        pipe,
        samples,
        config,
        Path(job["out_dir"]),
        Path(job["cache_dir"]),
        on_log=_print_log,
        base_model_id=job.get("base_model_id"),
        init_lora=init_lora,
    )
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        write_result(pipe, config, result, Path(job["result_dir"]))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m pipeline.train.worker JOB.json (got {argv})", file=sys.stderr)
        return 2
    try:
        run_job(Path(argv[0]))
    except CastloraError as exc:
        # One line the parent shows first; the traceback stays out of the user's way.
        print(ERROR_PREFIX + " ".join(str(exc).split()), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
