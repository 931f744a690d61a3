"""The Dagster UI as a person uses it, in headless Chromium against ``dagster dev`` on the demo's instance.

Slow: needs the shared ``castlora demo`` home (tests/conftest.py) plus about 3 minutes of its own.
Screenshots go to $CASTLORA_UI_SCREENSHOTS or a pytest tmp dir; their paths are printed and recorded as
test properties (junit xml).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ui.dagster_dev import REPO, DagsterDev

pytestmark = pytest.mark.slow

UI_PAIR = "uia__uib"
BACKFILL_PAIRS = ["bfa__bfb", "bfc__bfd"]  # two pairs already show whether their GPU steps overlap
ASSETS = (
    "character_images",
    "references",
    "segments",
    "captions",
    "class_images",
    "segmix_bank",
    "lora",
    "samples",
    "iteration",
)
TERMINAL_RUN = {"SUCCESS", "FAILURE", "CANCELED"}


def save(page, folder: Path, name: str, record_property) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot {name}: {path}")
    record_property(f"screenshot_{name}", str(path))
    return path


def register_with_cli(make_pair, demo_home, key: str) -> None:
    """`castlora register <folder>`, as a user would, against the instance dagster dev is serving."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "CASTLORA_HOME")}
    env.update(DAGSTER_HOME=str(demo_home.dagster_home), CASTLORA_HOME=str(demo_home.data_home))
    result = subprocess.run(
        [sys.executable, "-m", "assets.cli", "register", str(make_pair(key))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


RUNS_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status tags { key value } } } }
}
"""


def wait_for_run(server: DagsterDev, tags: list[dict], timeout: float) -> dict:
    """The newest run with ``tags`` once it has finished (bounded wait)."""
    deadline = time.monotonic() + timeout
    latest: dict = {}
    while time.monotonic() < deadline:
        runs = server.graphql(RUNS_QUERY, {"filter": {"tags": tags}})["runsOrError"]["results"]
        if runs:
            latest = runs[0]
            if latest["status"] in TERMINAL_RUN:
                return latest
        time.sleep(2)
    raise AssertionError(f"no finished run with tags {tags} after {timeout:.0f} s (last seen: {latest})")


def test_materialize_a_new_pair_from_the_ui(dagster_ui, page, demo_home, make_pair, screenshots, record_property):
    # The asset graph of the castlora group shows every stage.
    page.goto(f"{dagster_ui.url}/locations/castlora/asset-groups/castlora")
    page.get_by_text("evaluation", exact=True).first.wait_for()
    graph_text = page.inner_text("body")
    for asset in ASSETS:
        assert asset in graph_text, f"asset {asset!r} missing from the asset graph"
    save(page, screenshots, "asset_graph", record_property)

    # A user adds a pair with the CLI while the UI is open; the partitions tab lists it next to the demo's.
    register_with_cli(make_pair, demo_home, UI_PAIR)
    page.goto(f"{dagster_ui.url}/assets/references?view=partitions")
    page.get_by_text(UI_PAIR).first.wait_for()
    assert "dog6__dog2" in page.inner_text("body")

    # Materialize… -> pick only the new pair in the partition dialog -> "Launch 1 run".
    page.get_by_role("button", name="Materialize…").first.click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize references")
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_placeholder("Filter partitions").fill(UI_PAIR)
    page.get_by_role("menuitem", name=UI_PAIR).click()
    dialog.get_by_text("Launch runs to materialize references").click()  # closes the partition picker
    assert "1 partition" in dialog.inner_text()
    save(page, screenshots, "materialize_dialog", record_property)
    dialog.get_by_role("button", name="Launch 1 run").click()

    # The toast names the run (its id's first 8 characters); its page follows it to success.
    toast = page.get_by_text("Launched run")
    toast.wait_for()
    run_prefix = toast.inner_text().split("Launched run", 1)[1].split()[0]
    run = wait_for_run(dagster_ui, [{"key": "dagster/partition", "value": UI_PAIR}], timeout=300)
    assert run["runId"].startswith(run_prefix), (run, run_prefix)
    assert run["status"] == "SUCCESS", f"run {run['runId']} ended {run['status']}:\n{dagster_ui.log_tail()}"
    page.goto(f"{dagster_ui.url}/runs/{run['runId']}")
    page.get_by_text("Success", exact=True).first.wait_for()
    assert f"partition: {UI_PAIR}" in page.inner_text("body")
    save(page, screenshots, "run_succeeded", record_property)
    assert (demo_home.data_home / "pairs" / UI_PAIR / "references" / "manifest.parquet").is_file()

    # The demo's evaluation: its latest materialization's metadata, with the labels the asset emits.
    page.goto(f"{dagster_ui.url}/assets/evaluation?view=partitions&partition=dog6__dog2")
    page.get_by_text("images_per_variant").first.wait_for()
    evaluation_text = page.inner_text("body")
    for label in ("report", "metrics_file", "variants", "grid_dreambooth"):
        assert label in evaluation_text, f"evaluation metadata {label!r} not shown"
    assert "metrics.parquet" in evaluation_text
    save(page, screenshots, "evaluation_metadata", record_property)


ADD_PARTITION = """
mutation Add($selector: RepositorySelector!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: "character_pairs", partitionKey: $key) {
    __typename ... on Error { message }
  }
}
"""
LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) { __typename ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message } }
}
"""
BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { id status numPartitions }
    ... on Error { message } }
}
"""
BACKFILL_RUNS = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status startTime endTime
    tags { key value } stepStats { stepKey status startTime endTime } } } }
}
"""
MATERIALIZED = """
query Materialized($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) { ... on Asset { assetMaterializations(partitions: $partitions) { partition } } }
}
"""
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
REPOSITORY = {"repositoryLocationName": "castlora", "repositoryName": "__repository__"}


def wait_for_backfill(server: DagsterDev, backfill_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    backfill: dict = {}
    while time.monotonic() < deadline:
        backfill = server.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if backfill.get("status") in BACKFILL_DONE:
            return backfill
        time.sleep(3)
    raise AssertionError(f"backfill {backfill_id} not finished after {timeout:.0f} s: {backfill}")


def test_backfill_over_many_pairs_respects_the_gpu_pool(
    dagster_ui, page, demo_home, make_pair, screenshots, record_property
):
    from pipeline.spec import load_spec
    from pipeline.storage.paths import DataLayout
    from pipeline.storage.registry import register_pair

    # Register the pairs in the data home, and add their partitions through the server, as the UI does.
    layout = DataLayout(demo_home.data_home)
    for key in BACKFILL_PAIRS:
        register_pair(layout, load_spec(make_pair(key)))
        added = dagster_ui.graphql(ADD_PARTITION, {"selector": REPOSITORY, "key": key})["addDynamicPartition"]
        assert added["__typename"] == "AddDynamicPartitionSuccess", added

    params = {
        "partitionNames": BACKFILL_PAIRS,
        "assetSelection": [{"path": ["references"]}, {"path": ["segments"]}],
        "title": "castlora ui test backfill",
    }
    launched = dagster_ui.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    backfill = wait_for_backfill(dagster_ui, backfill_id, timeout=600)
    assert backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), f"{backfill}\n{dagster_ui.log_tail()}"
    for asset in ("references", "segments"):
        events = dagster_ui.graphql(MATERIALIZED, {"key": {"path": [asset]}, "partitions": BACKFILL_PAIRS})
        materialized = {event["partition"] for event in events["assetOrError"]["assetMaterializations"]}
        assert materialized == set(BACKFILL_PAIRS), f"{asset}: {materialized}"

    # The daemon launched one run per pair; their `segments` steps (pool "gpu", limit 1) never overlapped.
    runs = dagster_ui.graphql(BACKFILL_RUNS, {"filter": {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}})
    runs = runs["runsOrError"]["results"]
    assert {tag["value"] for run in runs for tag in run["tags"] if tag["key"] == "dagster/partition"} == set(
        BACKFILL_PAIRS
    )
    gpu_steps = sorted(
        (step["startTime"], step["endTime"])
        for run in runs
        for step in run["stepStats"]
        if step["stepKey"] == "segments" and step["status"] == "SUCCESS"
    )
    assert len(gpu_steps) == len(BACKFILL_PAIRS)
    for (_, previous_end), (start, _) in itertools.pairwise(gpu_steps):
        assert start >= previous_end, f"two `segments` steps overlapped despite the gpu pool limit: {gpu_steps}"
    by_start = sorted(runs, key=lambda run: run["startTime"])
    runs_in_parallel = any(later["startTime"] < earlier["endTime"] for earlier, later in itertools.pairwise(by_start))
    print(f"segments steps: {gpu_steps}; runs overlapped in time: {runs_in_parallel}")

    # The backfill's page in the UI shows it succeeded over the three pairs; the backfills list has it.
    page.goto(f"{dagster_ui.url}/runs/b/{backfill_id}")
    page.get_by_text("Succeeded", exact=True).first.wait_for()
    backfill_text = page.inner_text("body")
    assert all(key in backfill_text for key in BACKFILL_PAIRS), backfill_text[:2000]
    assert "100% completed" in backfill_text
    save(page, screenshots, "backfill", record_property)
    page.goto(f"{dagster_ui.url}/overview/backfills")
    page.get_by_text(backfill_id).first.wait_for()
    listing = page.inner_text("body")
    assert f"{len(BACKFILL_PAIRS)} partitions" in listing and "Success" in listing
    save(page, screenshots, "backfills_list", record_property)
