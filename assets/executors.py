"""Which executor runs a run's steps, chosen by ``CASTLORA_EXECUTOR`` so one code location serves every deployment.

- ``multiprocess`` (default, also when unset or empty): each step in its own process on the machine running the
  run (``make demo``, ``dagster dev``, docker compose). The ``gpu`` pool keeps GPU steps from sharing a card.
- ``in_process``: every step in the run worker's process (debugging).
- ``k8s``: dagster-k8s's ``k8s_job_executor``; each step becomes a Kubernetes Job whose pod spec comes from the
  step's ``dagster-k8s/config`` tag (assets/compute.py): GPU assets ask for ``nvidia.com/gpu: 1``, CPU assets for
  none. Needs the ``k8s`` extra (``pip install 'castlora[k8s]'``, installed in the docker images).

Tuning for the k8s executor (max_concurrent, retries, per-step overrides) is run config: deploy/k8s/run_config.yaml.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

EXECUTOR_ENV = "CASTLORA_EXECUTOR"
EXECUTOR_CHOICES = ("multiprocess", "in_process", "k8s")


def executor_for(name: str | None) -> dg.ExecutorDefinition:
    """The executor definition for a ``CASTLORA_EXECUTOR`` value; unknown values fail with the accepted ones."""
    choice = (name or "multiprocess").strip().lower() or "multiprocess"
    if choice == "multiprocess":
        return dg.multiprocess_executor
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as error:
            raise RuntimeError(
                f"{EXECUTOR_ENV}=k8s needs the dagster-k8s package: pip install 'castlora[k8s]' "
                "(the castlora docker images include it)."
            ) from error
        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={name!r} is not an executor; use one of {', '.join(EXECUTOR_CHOICES)}.")


def executor_from_env(env: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """``executor_for`` applied to ``CASTLORA_EXECUTOR`` from ``env`` (default: the process environment)."""
    return executor_for((os.environ if env is None else env).get(EXECUTOR_ENV))
