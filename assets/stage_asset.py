"""One way to declare a per-pair stage asset: partitioned by character pair, in the castlora group, on the GPU
pool or not, with its errors shown as one clear message (``user_errors``).

The asset's body opens ``storage.stage_run(context, stage)`` for its pair, spec, output folder and lineage
recorder; that block writes the lineage and publishes the stage when it succeeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg

from assets.compute import cpu_step, gpu_step
from assets.metadata import user_errors
from assets.partitions import character_pairs
from pipeline.stage_names import Stage

GROUP = "castlora"


def stage_asset(
    stage: Stage,
    *,
    gpu: bool,
    kinds: set[str],
    code_version: str,
    description: str,
    deps: Sequence[Any] = (),
) -> Callable[[Callable[..., dg.MaterializeResult]], dg.AssetsDefinition]:
    """Decorate the function that materializes ``stage`` for one pair; the asset is named after the stage.

    ``gpu``: the step runs in the GPU pool with one GPU per pod (``assets.compute``), else on CPU only.
    """

    def declare(materialize: Callable[..., dg.MaterializeResult]) -> dg.AssetsDefinition:
        return dg.asset(
            name=stage.value,
            partitions_def=character_pairs,
            group_name=GROUP,
            deps=list(deps) or None,
            code_version=code_version,
            kinds=kinds,
            description=description,
            **(gpu_step() if gpu else cpu_step()),
        )(user_errors(materialize))

    return declare
