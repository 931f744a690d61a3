"""Helpers shared by the launchpad UI tests (tests/ui/test_launchpad_*.py): a data home with one pair registered
the documented way and its own ``dagster dev``, the launchpad's partition picker and config editor, and the
GraphQL reads of a run and of an asset's latest materialization."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from assets.instance import InstanceSettings, ensure_instance
from tests.ui.dagster_dev import REPO, DagsterDev, start_dagster_dev

JOB_ASSETS = (
    "character_images",
    "references",
    "segments",
    "captions",
    "class_images",
    "segmix_bank",
    "lora",
    "samples",
    "iteration",
    "evaluation",
)
"""Every asset of the castlora_pair job, in graph order (character_images has nothing to render for photo pairs)."""

TERMINAL_RUN = {"SUCCESS", "FAILURE", "CANCELED"}
RUN_QUERY = """
query Run($id: ID!) {
  runOrError(runId: $id) { __typename ... on Run { runId status runConfigYaml tags { key value } } }
}
"""
MATERIALIZATIONS = """
query Materializations($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) { ... on Asset { assetMaterializations(partitions: $partitions, limit: 1) {
    runId partition
    metadataEntries { label __typename
      ... on TextMetadataEntry { text }
      ... on MarkdownMetadataEntry { mdStr }
      ... on PathMetadataEntry { path }
      ... on IntMetadataEntry { intValue } } } } }
}
"""


def castlora_cli(data_home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``castlora <args>`` against ``data_home`` (and its Dagster instance), as a user runs it; must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "CASTLORA_"))}
    env.update(CASTLORA_HOME=str(data_home), DAGSTER_HOME=str(data_home / "dagster_home"))
    done = subprocess.run(
        [sys.executable, "-m", "assets.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"castlora {' '.join(args)}: {done.stderr[-2000:]}"
    return done


@contextmanager
def served_home(data_home: Path, log: Path) -> Iterator[DagsterDev]:
    """``dagster dev`` on ``data_home``'s instance (gpu pool 1) with the in-process executor: on a small CPU machine
    the default multiprocess executor starts one Python process per step, which costs more than the tiny models'
    work."""
    ensure_instance(data_home / "dagster_home", InstanceSettings(gpu_slots=1))
    server = start_dagster_dev(
        data_home / "dagster_home", data_home, log, extra_env={"CASTLORA_EXECUTOR": "in_process"}
    )
    try:
        yield server
    finally:
        server.stop()


def save(page, folder: Path, name: str, record_property) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot {name}: {path}")
    record_property(f"screenshot_{name}", str(path))
    return path


def open_launchpad(page, server: DagsterDev, pair: str) -> None:
    """Jobs → castlora_pair → the launchpad ("New Run"), with ``pair`` picked in the Partition box (the config
    reloads for it)."""
    page.goto(f"{server.url}/locations/castlora/jobs/castlora_pair/playground")
    page.locator(".CodeMirror").first.wait_for()
    picker = page.get_by_placeholder("Partition")
    picker.click()
    picker.fill(pair)
    page.get_by_role("menuitem", name=pair).click()
    page.get_by_text(f"partition: {pair}").first.wait_for()


def editor_text(page) -> str:
    return page.locator(".CodeMirror").first.evaluate("element => element.CodeMirror.getValue()")


def launch(page) -> str:
    """Click Launch Run (once the config has no errors); returns the new run's id from the run page's URL."""
    page.get_by_text("No errors").wait_for()
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=120_000)
    return re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)


def wait_for_run(server: DagsterDev, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = server.graphql(RUN_QUERY, {"id": run_id})["runOrError"]
        if run.get("status") in TERMINAL_RUN:
            return run
        time.sleep(5)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f} s (last seen: {run.get('status')})")


def latest_metadata(server: DagsterDev, asset: str, pair: str) -> tuple[str, dict[str, str]]:
    """The run id of ``asset``'s latest materialization of ``pair``, and its metadata entries as text (text,
    markdown, path and integer entries; others as "")."""
    found = server.graphql(MATERIALIZATIONS, {"key": {"path": [asset]}, "partitions": [pair]})
    events = found["assetOrError"]["assetMaterializations"]
    assert events, f"{asset} has no materialization for {pair}"
    entries = {
        entry["label"]: entry.get("text") or entry.get("mdStr") or entry.get("path") or str(entry.get("intValue", ""))
        for entry in events[0]["metadataEntries"]
    }
    return events[0]["runId"], entries
