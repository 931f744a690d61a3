"""Fixtures of the end-to-end asset tests: the pair job materialized once per module, on a chosen preset."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from assets.definitions import build_resources, defs
from assets.jobs import pair_job
from assets.partitions import character_pairs
from pipeline.spec import load_spec
from pipeline.storage.paths import DataLayout
from pipeline.storage.registry import register_pair
from tests.conftest import ball_pair

PAIR = "red__blue"

MaterializedPair = tuple[DataLayout, Any, dict[str, Any], dict[str, Any]]
"""(data layout, the job's result, materializations by asset key, check evaluations by check name)."""


@pytest.fixture(scope="module")
def materialize_pair(tmp_path_factory) -> Callable[..., AbstractContextManager[MaterializedPair]]:
    """A factory: ``with materialize_pair("e2e", run_config, env) as (layout, result, materializations, checks)``
    registers the pair that ``pair(root)`` writes (default: the two-ball pair, ``tests.conftest.ball_pair``) as the
    inbox sensor does, in a fresh data home ``root/home`` (``root``: a temporary folder named ``name``); runs the
    whole pair job for it in one test Dagster instance (step failures recorded, not raised) with ``run_config`` and
    the resources of ``env`` (``CASTLORA_HOME`` set to that home; e.g. ``CASTLORA_PRESET``); and keeps the instance
    open while the block runs."""

    @contextmanager
    def run(
        name: str,
        run_config: dict[str, Any],
        env: dict[str, str] | None = None,
        pair: Callable[[Path], Path] = ball_pair,
    ) -> Iterator[MaterializedPair]:
        root = tmp_path_factory.mktemp(name)
        layout = DataLayout.at(root / "home")
        spec = load_spec(pair(root), confine=True)  # as the inbox sensor registers it
        register_pair(layout, spec)
        job = defs.resolve_job_def(pair_job.name)
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(character_pairs.name, [spec.pair])
            result = job.execute_in_process(
                run_config=run_config,
                instance=instance,
                partition_key=spec.pair,
                resources=build_resources({"CASTLORA_HOME": str(layout.home), **(env or {})}),
                raise_on_error=False,
            )
            materializations = {
                e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()
            }
            checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
            yield layout, result, materializations, checks

    return run
