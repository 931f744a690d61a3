"""The Dagster instance config from assets/instance.py: valid for Dagster, Postgres for real, the GPU pool, retries."""

import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.instance import DagsterInstance

from assets.compute import GPU_POOL
from assets.definitions import build_resources, defs
from assets.instance import (
    POSTGRES_URL_VAR,
    InstanceSettings,
    ensure_instance,
    main,
    open_instance,
    render_instance_config,
)
from assets.partitions import character_pairs
from pipeline.errors import CastloraError
from pipeline.spec import load_spec
from pipeline.storage.paths import DataLayout
from pipeline.storage.registry import register_pair
from tests.assets import pool_job
from tests.conftest import ball_pair


@pytest.fixture
def pg_url(postgres_database: str) -> str:
    """The test database as Dagster wants it: SQLAlchemy URL with the psycopg2 driver."""
    return postgres_database.replace("postgresql://", "postgresql+psycopg2://", 1)


GPU_ASSETS = {"character_images", "segments", "class_images", "lora", "samples", "iteration", "evaluation"}


def test_settings_from_env_defaults_and_errors():
    assert InstanceSettings.from_env({}) == InstanceSettings(gpu_slots=1, postgres_url="", run_retries=2)
    url = "postgresql+psycopg2://u:p@db:5432/x"
    env = {"CASTLORA_GPU_SLOTS": "3", "CASTLORA_RUN_RETRIES": "0", POSTGRES_URL_VAR: url}
    assert InstanceSettings.from_env(env) == InstanceSettings(3, url, 0)
    with pytest.raises(CastloraError, match="CASTLORA_GPU_SLOTS must be a whole number"):
        InstanceSettings.from_env({"CASTLORA_GPU_SLOTS": "two"})
    with pytest.raises(CastloraError, match="CASTLORA_GPU_SLOTS must be at least 1"):
        InstanceSettings(gpu_slots=0)
    for wrong in ("mysql://u:secret@db/x", "postgresql://u:secret@db/x"):
        with pytest.raises(
            CastloraError, match=r"CASTLORA_POSTGRES_URL must look like postgresql\+psycopg2://"
        ) as error:
            InstanceSettings(postgres_url=wrong)
        assert "secret" not in str(error.value)


def test_rendered_config_keeps_the_password_out_of_the_file(tmp_path):
    settings = InstanceSettings(
        gpu_slots=2, postgres_url="postgresql+psycopg2://u:hunter2@db:5432/dagster", run_retries=4
    )
    config = render_instance_config(settings)
    assert config["storage"] == {"postgres": {"postgres_url": {"env": POSTGRES_URL_VAR}}}
    assert config["concurrency"]["pools"] == {"granularity": "op", "default_limit": 2}
    assert config["run_retries"] == {"enabled": True, "max_retries": 4, "retry_on_asset_or_op_failure": False}
    assert config["telemetry"] == {"enabled": False}
    assert "storage" not in render_instance_config(InstanceSettings())
    assert render_instance_config(InstanceSettings(run_retries=0))["run_retries"]["enabled"] is False

    path = ensure_instance(tmp_path / "sqlite_home", InstanceSettings(gpu_slots=2))
    assert "hunter2" not in path.read_text()


def test_sqlite_config_validates_and_sets_the_gpu_pool(tmp_path):
    home = tmp_path / "home"
    path = ensure_instance(home, InstanceSettings(gpu_slots=2, run_retries=3))
    with DagsterInstance.from_config(str(home)) as instance:  # Dagster's own config validation
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 3
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.global_op_concurrency_default_limit == 2
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 2
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).using_default_limit
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 7)  # someone sets the pool by hand
    first = path.stat().st_mtime_ns
    ensure_instance(home, InstanceSettings(gpu_slots=2, run_retries=3))
    assert path.stat().st_mtime_ns == first  # unchanged settings: file left alone
    with DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert (info.slot_count, info.using_default_limit) == (2, True)  # the config wins over the hand-set 7
    ensure_instance(home, InstanceSettings(gpu_slots=1))
    assert yaml.safe_load(path.read_text())["concurrency"]["pools"]["default_limit"] == 1
    with DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert (info.slot_count, info.using_default_limit) == (1, True)
    assert [p.name for p in home.iterdir() if p.name.startswith(".dagster.")] == []  # no temp files left


def test_module_entry_point_writes_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASTLORA_GPU_SLOTS", "4")
    monkeypatch.delenv(POSTGRES_URL_VAR, raising=False)
    assert main([str(tmp_path / "h")]) == 0
    assert yaml.safe_load((tmp_path / "h" / "dagster.yaml").read_text())["concurrency"]["pools"]["default_limit"] == 4
    monkeypatch.setenv("CASTLORA_GPU_SLOTS", "-1")
    assert main([str(tmp_path / "h")]) == 2
    assert "CASTLORA_GPU_SLOTS must be at least 1" in capsys.readouterr().err


def test_postgres_config_validates_against_a_real_server(tmp_path, pg_url, monkeypatch):
    monkeypatch.setenv(POSTGRES_URL_VAR, pg_url)
    home = tmp_path / "home"
    ensure_instance(home, InstanceSettings(gpu_slots=3, postgres_url=pg_url))
    with DagsterInstance.from_config(str(home)) as instance:  # reads the URL from the env var
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 3


@pytest.mark.slow  # dagster-postgres retries the connection for ~10 s before giving up
def test_unreachable_postgres_is_a_clear_error_without_the_password(tmp_path, postgres_server):
    url = f"postgresql+psycopg2://nobody:s3cret@127.0.0.1:{postgres_server.port}/no_such_db"
    with pytest.raises(CastloraError, match="Could not open the Dagster instance on Postgres") as error:
        ensure_instance(tmp_path / "home", InstanceSettings(postgres_url=url))
    assert "s3cret" not in str(error.value)


def test_only_gpu_assets_carry_the_gpu_pool():
    pools = {}
    for assets_def in defs.assets:
        for key in assets_def.keys:
            pools[key.to_user_string()] = assets_def.op.pool
    assert {key for key, pool in pools.items() if pool == GPU_POOL} == GPU_ASSETS
    assert {pool for key, pool in pools.items() if key not in GPU_ASSETS} == {None}


@pytest.mark.slow
def test_materialization_lands_in_postgres(tmp_path, pg_url, monkeypatch):
    monkeypatch.setenv(POSTGRES_URL_VAR, pg_url)
    settings = InstanceSettings(postgres_url=pg_url)
    home = tmp_path / "dagster_home"
    ensure_instance(home, settings)
    layout = DataLayout.at(tmp_path / "data")
    register_pair(layout, load_spec(ball_pair(tmp_path)))
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(character_pairs.name, ["red__blue"])
        result = dg.materialize(
            [*defs.assets, *defs.asset_checks],  # the project's assets; only the two cheap ones run
            selection=[dg.AssetKey("references"), dg.AssetKey("segments")],
            run_config={"ops": {"references": {"config": {"min_side": 128}}}},
            instance=instance,
            partition_key="red__blue",
            resources=build_resources({"CASTLORA_HOME": str(layout.home), "CASTLORA_DEVICE": "cpu"}),
            raise_on_error=False,
        )
        assert result.success
        run_id = result.run_id

    # A second instance object on the same database sees the run, the partition and both materializations.
    with open_instance(home, settings) as reader:
        assert reader.get_run_by_id(run_id).is_success
        assert reader.get_dynamic_partitions(character_pairs.name) == ["red__blue"]
        for key in ("references", "segments"):
            event = reader.get_latest_materialization_event(dg.AssetKey(key))
            assert event is not None and event.run_id == run_id
            assert event.asset_materialization.partition == "red__blue"
        status = reader.get_materialized_partitions(dg.AssetKey("segments"))
        assert status == {"red__blue"}


def _run_two_gpu_steps(instance: DagsterInstance, record_dir: Path) -> dict[str, tuple[float, float]]:
    record_dir.mkdir()
    result = dg.execute_job(
        dg.reconstructable(pool_job.get_job), instance=instance, run_config=pool_job.run_config(record_dir)
    )
    assert result.success
    return pool_job.intervals(record_dir)


def _overlap(intervals: dict[str, tuple[float, float]]) -> float:
    (a_start, a_end), (b_start, b_end) = intervals.values()
    return min(a_end, b_end) - max(a_start, b_start)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_gpu_pool_limits_concurrent_steps(tmp_path, storage, request, monkeypatch):
    url = request.getfixturevalue("pg_url") if storage == "postgres" else ""
    if url:
        monkeypatch.setenv(POSTGRES_URL_VAR, url)
    home = tmp_path / "home"
    ensure_instance(home, InstanceSettings(gpu_slots=1, postgres_url=url))
    with DagsterInstance.from_config(str(home)) as instance:
        one_slot = _run_two_gpu_steps(instance, tmp_path / "one_slot")
    # A gap, not just "no overlap": the second step waits for the first to free its slot.
    assert _overlap(one_slot) < 0, f"two GPU steps ran at once with gpu_slots=1: {one_slot}"
    if storage == "sqlite":
        return  # sqlite enforces pools too; the run that proves the limit is what serialises them is on Postgres

    ensure_instance(home, InstanceSettings(gpu_slots=2, postgres_url=url))
    with DagsterInstance.from_config(str(home)) as instance:
        two_slots = _run_two_gpu_steps(instance, tmp_path / "two_slots")
    assert _overlap(two_slots) > 0, f"gpu_slots=2 did not run both at once: {two_slots}"


def _launch(instance: DagsterInstance, request_context, job: dg.JobDefinition, run_config: dict) -> str:
    remote_job = request_context.get_code_location("retry_test").get_repository("__repository__").get_full_job(job.name)
    run = instance.create_run_for_job(
        job_def=job,
        run_config=run_config,
        remote_job_origin=remote_job.get_remote_origin(),
        job_code_origin=remote_job.get_python_origin(),
    )
    instance.launch_run(run.run_id, request_context)  # DefaultRunLauncher: a `dagster api execute_run` process
    return run.run_id


def _wait_until(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
def test_killed_run_is_retried_and_user_error_is_not(tmp_path):
    import logging

    from dagster._core.storage.dagster_run import DagsterRunStatus
    from dagster._core.storage.tags import (
        PARENT_RUN_ID_TAG,
        RETRY_NUMBER_TAG,
        RUN_FAILURE_REASON_TAG,
        WILL_RETRY_TAG,
    )
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.auto_run_reexecution.auto_run_reexecution import consume_new_runs_for_automatic_reexecution

    from tests.assets import retry_job

    home = tmp_path / "home"
    ensure_instance(home, InstanceSettings(run_retries=2))
    target = ModuleTarget(
        module_name="tests.assets.retry_job",
        attribute=None,
        working_directory=str(Path(__file__).resolve().parents[2]),
        location_name="retry_test",
    )
    pid_file = tmp_path / "run_worker.pid"
    with (
        DagsterInstance.from_config(str(home)) as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):
        context = workspace.create_request_context()
        killed_id = _launch(
            instance,
            context,
            retry_job.killable,
            {"ops": {"wait_to_be_killed": {"config": {"pid_file": str(pid_file)}}}},
        )
        failed_id = _launch(instance, context, retry_job.failing, {})
        pid = int(_wait_until(lambda: pid_file.is_file() and pid_file.read_text(), "the run worker's pid"))
        os.kill(pid, signal.SIGTERM)  # what Kubernetes sends a pod it evicts
        finished = {DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS, DagsterRunStatus.CANCELED}
        for run_id in (killed_id, failed_id):
            _wait_until(lambda r=run_id: instance.get_run_by_id(r).status in finished, f"run {run_id} to finish")
        killed, failed = instance.get_run_by_id(killed_id), instance.get_run_by_id(failed_id)
        assert (killed.status, killed.tags[RUN_FAILURE_REASON_TAG]) == (
            DagsterRunStatus.FAILURE,
            "UNEXPECTED_TERMINATION",
        )
        assert (failed.status, failed.tags[RUN_FAILURE_REASON_TAG]) == (DagsterRunStatus.FAILURE, "STEP_FAILURE")

        # One tick of the daemon's retry logic over both failed runs.
        records = instance.get_run_records()
        list(consume_new_runs_for_automatic_reexecution(workspace, records, logging.getLogger("test")))

        retries = [r for r in instance.get_runs() if r.tags.get(PARENT_RUN_ID_TAG) in (killed_id, failed_id)]
        assert [(r.tags[PARENT_RUN_ID_TAG], r.tags[RETRY_NUMBER_TAG]) for r in retries] == [(killed_id, "1")]
        assert retries[0].job_name == "killable" and retries[0].status == DagsterRunStatus.QUEUED  # for the run queue
        assert instance.get_run_by_id(killed_id).tags[WILL_RETRY_TAG] == "true"
        assert instance.get_run_by_id(failed_id).tags[WILL_RETRY_TAG] == "false"
