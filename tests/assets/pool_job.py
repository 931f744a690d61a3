"""A reconstructable job with two independent GPU-pool ops that record when they ran (for the pool test)."""

import time
from pathlib import Path

import dagster as dg

from assets.compute import GPU_POOL

HOLD_SECONDS = 2.0


class RecordConfig(dg.Config):
    record_dir: str


def _hold_gpu(name: str, config: RecordConfig) -> None:
    start = time.time()
    time.sleep(HOLD_SECONDS)
    # One file per op, written at the end: "start end" in epoch seconds.
    (Path(config.record_dir) / f"{name}.txt").write_text(f"{start} {time.time()}\n")


@dg.op(pool=GPU_POOL)
def gpu_a(config: RecordConfig) -> None:
    _hold_gpu("gpu_a", config)


@dg.op(pool=GPU_POOL)
def gpu_b(config: RecordConfig) -> None:
    _hold_gpu("gpu_b", config)


# spawn (Dagster's default), not forkserver: a forkserver is started once per process and keeps the environment it
# started with, so a later test's CASTLORA_POSTGRES_URL would never reach its step workers.
@dg.job(executor_def=dg.multiprocess_executor)
def two_gpu_steps():
    gpu_a()
    gpu_b()


def get_job() -> dg.JobDefinition:
    return two_gpu_steps


def run_config(record_dir: Path) -> dict:
    return {"ops": {name: {"config": {"record_dir": str(record_dir)}} for name in ("gpu_a", "gpu_b")}}


def intervals(record_dir: Path) -> dict[str, tuple[float, float]]:
    found = {}
    for name in ("gpu_a", "gpu_b"):
        start, end = (record_dir / f"{name}.txt").read_text().split()
        found[name] = (float(start), float(end))
    return found
