"""A tiny code location for the run-retry test: one run to kill from outside, one that fails on a user error.

Kept free of castlora imports so its code server and run worker start quickly.
"""

import os
import time
from pathlib import Path

import dagster as dg

MAX_WAIT_SECONDS = 60.0


class PidConfig(dg.Config):
    pid_file: str


@dg.op
def wait_to_be_killed(config: PidConfig) -> None:
    # In-process executor: this is the run worker's own pid, the process a lost pod or an OOM kill takes down.
    Path(config.pid_file).write_text(str(os.getpid()))
    deadline = time.monotonic() + MAX_WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.1)


@dg.op
def bad_input() -> None:
    raise ValueError("a user error: retrying would only repeat it")


@dg.job(executor_def=dg.in_process_executor)
def killable():
    wait_to_be_killed()


@dg.job(executor_def=dg.in_process_executor)
def failing():
    bad_input()


defs = dg.Definitions(jobs=[killable, failing])
