"""Where each asset's work runs: GPU assets share the ``gpu`` pool and ask Kubernetes for one GPU each.

The pool caps how many GPU steps run at once on one machine (its limit lives in the instance config,
``concurrency.pools``); the ``dagster-k8s/config`` tag gives the step's pod ``nvidia.com/gpu: 1`` when the
``k8s_job_executor`` runs each step in its own pod. CPU assets carry neither, so they never wait for a GPU.
"""

from __future__ import annotations

from typing import Any

GPU_POOL = "gpu"
K8S_CONFIG_TAG = "dagster-k8s/config"

GPU_POD_RESOURCES: dict[str, Any] = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
        }
    },
    "pod_spec_config": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}

CPU_POD_RESOURCES: dict[str, Any] = {
    "container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}},
}


def gpu_step() -> dict[str, Any]:
    """Keyword arguments for ``@dg.asset`` of an asset whose step needs a GPU."""
    return {"pool": GPU_POOL, "op_tags": {K8S_CONFIG_TAG: GPU_POD_RESOURCES}}


def cpu_step() -> dict[str, Any]:
    """Keyword arguments for ``@dg.asset`` of an asset that runs on CPU only."""
    return {"op_tags": {K8S_CONFIG_TAG: CPU_POD_RESOURCES}}
