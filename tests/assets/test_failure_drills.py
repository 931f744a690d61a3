"""Failure drills through Dagster: a training run killed mid-way resumes on re-materialization and ends with the
same LoRA as an uninterrupted run; a full disk or an unwritable data home fails with the path named."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import dagster as dg
import pytest
from safetensors.torch import load_file

from assets.definitions import build_resources
from assets.jobs import PAIR_ASSETS
from assets.partitions import character_pairs
from assets.training_assets import lora
from pipeline.spec import load_spec
from pipeline.stages.lora import current_lora
from pipeline.storage.paths import DataLayout
from pipeline.storage.registry import register_pair
from pipeline.train.checkpoint import list_checkpoints
from tests.assets.test_materialize import RUN_CONFIG
from tests.conftest import REPO, ball_pair

PAIR = "a__b"
UPSTREAM = ["references", "segments", "captions", "class_images", "segmix_bank"]
# Enough steps that the kill lands long before the end; checkpoints often enough that one exists early.
LORA_CONFIG = {**RUN_CONFIG["ops"]["lora"]["config"], "steps": 60, "checkpoint_every": 5, "log_every": 10}


@pytest.fixture(scope="module")
def upstream_home(tmp_path_factory):
    """A data home whose pair has every stage the LoRA trains from (materialized once for the module)."""
    root = tmp_path_factory.mktemp("drills")
    folder = ball_pair(root, PAIR)
    layout = DataLayout.at(root / "home")
    register_pair(layout, load_spec(folder))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, [PAIR])
        result = dg.materialize(
            PAIR_ASSETS,
            selection=UPSTREAM,
            run_config={"ops": {k: v for k, v in RUN_CONFIG["ops"].items() if k in UPSTREAM}},
            instance=instance,
            partition_key=PAIR,
            resources=build_resources({"CASTLORA_HOME": str(layout.home)}),
        )
        assert result.success
    return layout


def _train_in_process(layout: DataLayout, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, [PAIR])
        return dg.materialize(
            [lora],
            instance=instance,
            partition_key=PAIR,
            run_config={"ops": {"lora": {"config": LORA_CONFIG}}},
            resources=build_resources({"CASTLORA_HOME": str(layout.home)}),
            raise_on_error=raise_on_error,
        )


def _lora_tensors(layout: DataLayout) -> dict:
    return load_file(current_lora(layout.stage_dir(PAIR, "lora")).diffusers)


KILLED_RUN = textwrap.dedent(
    """
    import sys
    import dagster as dg
    from assets.definitions import build_resources
    from assets.training_assets import lora

    home, config = sys.argv[1], __import__("json").loads(sys.argv[2])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("character_pairs", ["{pair}"])
    run_config = {{"ops": {{"lora": {{"config": config}}}}}}
    resources = build_resources({{"CASTLORA_HOME": home}})
    dg.materialize([lora], instance=instance, partition_key="{pair}", run_config=run_config, resources=resources)
    """
).format(pair=PAIR)


@pytest.mark.slow
def test_killed_training_resumes_and_ends_with_the_uninterrupted_lora(upstream_home):
    layout = upstream_home
    lora_root = layout.stage_dir(PAIR, "lora")
    uninterrupted = _train_in_process(layout)
    assert uninterrupted.success
    expected = _lora_tensors(layout)
    for child in sorted(lora_root.rglob("*"), reverse=True):  # start over: no checkpoints, no export
        child.unlink() if child.is_file() else child.rmdir()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(layout.home), json.dumps(LORA_CONFIG)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while not [found for version in lora_root.glob("*/") for found in list_checkpoints(version)]:
            assert process.poll() is None, (
                f"training process ended before its first checkpoint: {process.stderr.read()}"
            )
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # like an OOM kill or a preempted node: no cleanup runs
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert not (lora_root / "current.json").exists(), "the run finished before the kill; the drill proves nothing"

    resumed = _train_in_process(layout)
    meta = resumed.get_asset_materialization_events()[0].materialization.metadata
    assert meta["resumed_from_step"].value > 0 and meta["steps"].value == LORA_CONFIG["steps"]
    got = _lora_tensors(layout)
    assert set(got) == set(expected)
    # CPU training is deterministic here, so the resumed LoRA equals the uninterrupted one bit for bit.
    assert all((got[key] == expected[key]).all() for key in expected)


def test_full_disk_fails_with_the_path_and_keeps_finished_stages(upstream_home, monkeypatch):
    """ENOSPC while a stage writes: the step fails naming the file and the fix; earlier stages stay intact."""
    layout = upstream_home
    bank_manifest = layout.stage_dir(PAIR, "segmix_bank") / "manifest.parquet"
    before = bank_manifest.read_bytes()
    target = layout.stage_dir(PAIR, "lora") / "current.json"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    # The disk fills up when the finished LoRA's pointer file is written.
    monkeypatch.setattr("pipeline.lora.record.write_json_atomic", disk_full)
    result = _train_in_process(layout, raise_on_error=False)
    assert not result.success and not result.get_asset_materialization_events()
    message = _failure_message(result)
    assert "disk is full" in message and str(target) in message and "CASTLORA_HOME" in message
    assert bank_manifest.read_bytes() == before


def test_data_home_that_is_a_file_is_refused_with_its_path(tmp_path):
    home = tmp_path / "not_a_folder"
    home.write_text("oops")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, [PAIR])
        result = dg.materialize(
            [lora],
            instance=instance,
            partition_key=PAIR,
            resources=build_resources({"CASTLORA_HOME": str(home)}),
            raise_on_error=False,
        )
    message = _failure_message(result)
    assert str(home) in message and "not a folder" in message


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    data = failure.step_failure_data
    return (data.user_failure_data.description if data.user_failure_data else None) or data.error.message
