"""The retraining schedule requests runs for stale pairs only: changed photos/spec, changed code version, never run."""

import datetime as dt
import os
import subprocess
import sys

import dagster as dg
import pytest

from assets.definitions import build_resources, defs
from assets.pair_assets import references
from assets.partitions import character_pairs
from assets.schedules import CODE_VERSION_TAG, code_versions, retrain_schedule
from pipeline.spec import load_spec
from pipeline.storage.paths import DataLayout
from pipeline.storage.registry import register_pair
from tests.conftest import subject_photo

PAIRS = ["a__b", "c__d"]


@pytest.fixture
def fresh(tmp_path, make_pair):
    """Two registered pairs whose every asset is materialized with today's code versions."""
    layout = DataLayout.at(tmp_path / "home")
    folders = {}
    for pair in PAIRS:
        folders[pair] = make_pair(pair)
        register_pair(layout, load_spec(folders[pair]))
    resources = build_resources({"CASTLORA_HOME": str(layout.home)})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, PAIRS)
        for pair in PAIRS:
            # A real run of `references`: it records its code version and the photos' fingerprint.
            result = dg.materialize(
                [references],
                partition_key=pair,
                instance=instance,
                resources=resources,
                run_config={"ops": {"references": {"config": {"min_side": 128}}}},
            )
            assert result.success
            for key, version in code_versions().items():
                if key != references.key:
                    _report(instance, key, pair, version)
        yield instance, resources, folders


def _report(instance, key, pair, version):
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=key, partition=pair, tags={CODE_VERSION_TAG: version})
    )


def _evaluate(instance, resources):
    context = dg.build_schedule_context(
        instance=instance,
        resources={"storage": resources["storage"]},
        scheduled_execution_time=dt.datetime(2026, 11, 22, 3, tzinfo=dt.UTC),
    )
    result = retrain_schedule(context)
    if isinstance(result, dg.SkipReason):
        return {}
    return {request.partition_key: request for request in result}


def test_up_to_date_pairs_are_not_retrained(fresh):
    instance, resources, _ = fresh
    assert _evaluate(instance, resources) == {}


def test_changed_photo_makes_only_its_pair_stale(fresh):
    instance, resources, folders = fresh
    photo = folders["a__b"] / "a" / "01.jpg"
    subject_photo(seed=99, colour=(10, 200, 10)).save(photo)  # same name, new bytes
    requests = _evaluate(instance, resources)
    assert set(requests) == {"a__b"}
    assert "spec or photos changed" in requests["a__b"].tags["castlora/retrain_reason"]
    assert requests["a__b"].job_name in (None, "castlora_pair")


def test_changed_code_version_and_never_materialized_pairs_are_stale(fresh):
    instance, resources, _ = fresh
    _report(instance, dg.AssetKey("lora"), "c__d", "lora-v0")  # made by older code
    instance.add_dynamic_partitions(character_pairs.name, ["e__f"])  # registered in Dagster, never run
    requests = _evaluate(instance, resources)
    assert set(requests) == {"c__d", "e__f"}
    assert requests["c__d"].tags["castlora/retrain_reason"] == "lora: code version lora-v0 -> lora-v2"
    assert "references: never materialized" in requests["e__f"].tags["castlora/retrain_reason"]


def test_schedule_is_in_the_definitions_and_its_cron_comes_from_the_environment():
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.job_name == "castlora_pair"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    cron = subprocess.run(
        [sys.executable, "-c", "from assets.schedules import retrain_schedule as s; print(s.cron_schedule)"],
        env={**os.environ, "CASTLORA_RETRAIN_CRON": "15 2 * * *"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert cron == "15 2 * * *"
