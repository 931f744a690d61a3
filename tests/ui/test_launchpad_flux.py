"""A new user tries FLUX.1 from the UI: register the sample pair, open the job's launchpad, pick the pair's
partition, change the models resource's ``preset`` to ``tiny-flux`` in the config editor, launch, and every
asset materializes for FLUX.1 (docs/design.md#flux1).

Slow (minutes on an idle 2-core machine; 18 minutes when six jobs shared those cores): its own data home and
``dagster dev`` (not the shared demo's), so it needs no SDXL demo run. The run uses the launchpad's defaults, as a
user's first run would, on the in-process executor: on a small CPU machine the default multiprocess executor starts
one Python process per step (16 here: 9 assets, 7 checks), which costs more than the tiny models' work.
Screenshots go where tests/ui/conftest.py says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from assets.instance import InstanceSettings, ensure_instance
from tests.ui.conftest import open_page
from tests.ui.dagster_dev import REPO, DagsterDev, start_dagster_dev

pytestmark = pytest.mark.slow

PAIR = "dog6__dog2"
SAMPLE = REPO / "samples" / PAIR
ASSETS = (
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
VARIANTS = ("dreambooth", "segmix", "segmix_init", "iterative")
TERMINAL_RUN = {"SUCCESS", "FAILURE", "CANCELED"}
RUN_TIMEOUT_S = 1800  # about 3 minutes on an idle 2-core machine; shared CI machines are far slower

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
      ... on PathMetadataEntry { path } } } } }
}
"""


@pytest.fixture(scope="module")
def flux_ui(tmp_path_factory) -> Iterator[tuple[DagsterDev, Path]]:
    """A fresh data home with the sample pair registered the documented way (``castlora register``), served by
    ``dagster dev``; yields the server and the data home."""
    data_home = tmp_path_factory.mktemp("flux_ui") / "home"
    dagster_home = data_home / "dagster_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "CASTLORA_"))}
    env.update(CASTLORA_HOME=str(data_home), DAGSTER_HOME=str(dagster_home))
    registered = subprocess.run(
        [sys.executable, "-m", "assets.cli", "register", str(SAMPLE)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert registered.returncode == 0, registered.stderr[-2000:]
    ensure_instance(dagster_home, InstanceSettings(gpu_slots=1))
    log = tmp_path_factory.mktemp("dagster_dev_flux") / "dagster_dev.log"
    server = start_dagster_dev(dagster_home, data_home, log, extra_env={"CASTLORA_EXECUTOR": "in_process"})
    yield server, data_home
    server.stop()


def save(page, folder: Path, name: str, record_property) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot {name}: {path}")
    record_property(f"screenshot_{name}", str(path))


def wait_for_run(server: DagsterDev, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = server.graphql(RUN_QUERY, {"id": run_id})["runOrError"]
        if run.get("status") in TERMINAL_RUN:
            return run
        time.sleep(5)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f} s (last seen: {run.get('status')})")


def latest_metadata(server: DagsterDev, asset: str) -> tuple[str, dict[str, str]]:
    """The run id of ``asset``'s latest materialization of the pair, and its metadata entries as text."""
    found = server.graphql(MATERIALIZATIONS, {"key": {"path": [asset]}, "partitions": [PAIR]})
    events = found["assetOrError"]["assetMaterializations"]
    assert events, f"{asset} has no materialization for {PAIR}"
    entries = {
        entry["label"]: entry.get("text") or entry.get("mdStr") or entry.get("path") or ""
        for entry in events[0]["metadataEntries"]
    }
    return events[0]["runId"], entries


def set_preset_in_editor(page, preset: str) -> str:
    """Change ``resources.models.config.preset`` in the launchpad's YAML editor as a person would: go to the end of
    the config (the models resource sits near it), double-click the preset's value and type the new one. Returns
    the editor's text."""
    editor = page.locator(".CodeMirror").first
    editor.click()
    page.keyboard.press("Control+End")
    line = page.locator(".CodeMirror-line").filter(has_text=re.compile(r"^\s*preset: '?tiny'?\s*$"))
    line.get_by_text(re.compile(r"^'?tiny'?$")).dblclick()  # a double-click selects the word, not the quotes
    page.keyboard.type(preset)
    return editor.evaluate("element => element.CodeMirror.getValue()")


def test_launchpad_tiny_flux_materializes(flux_ui, browser, screenshots, record_property):
    server, data_home = flux_ui
    with open_page(browser, server.url) as page:
        # Jobs → castlora_pair → the launchpad ("New Run"), as the job page's tab offers it.
        page.goto(f"{server.url}/locations/castlora/jobs/castlora_pair/playground")
        page.locator(".CodeMirror").first.wait_for()

        # The job is partitioned by pair: pick the registered one (it reloads the config for that partition).
        picker = page.get_by_placeholder("Partition")
        picker.click()
        picker.fill(PAIR)
        page.get_by_role("menuitem", name=PAIR).click()
        page.get_by_text(f"partition: {PAIR}").first.wait_for()

        config = set_preset_in_editor(page, "tiny-flux")
        assert re.search(r"^      preset: '?tiny-flux'?$", config, re.MULTILINE), config[-1500:]
        page.get_by_text("No errors").wait_for()
        save(page, screenshots, "launchpad_tiny_flux", record_property)

        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=120_000)
        run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)

        run = wait_for_run(server, run_id, RUN_TIMEOUT_S)
        assert run["status"] == "SUCCESS", f"run {run_id} ended {run['status']}:\n{server.log_tail()}"
        assert re.search(r"preset: '?tiny-flux'?", run["runConfigYaml"]), run["runConfigYaml"]
        assert {"key": "dagster/partition", "value": PAIR} in run["tags"]
        page.reload()
        page.get_by_text("Success", exact=True).first.wait_for()
        save(page, screenshots, "tiny_flux_run_succeeded", record_property)

        # Every asset of the job materialized for the pair in this run.
        metadata = {}
        for asset in ASSETS:
            materialized_in, metadata[asset] = latest_metadata(server, asset)
            assert materialized_in == run_id, f"{asset}: latest materialization from run {materialized_in}"

        # The LoRA is a FLUX.1 LoRA: the asset says so in the UI, and its files are FLUX's.
        lora = metadata["lora"]
        assert lora["family"] == "flux" and lora["base_model"] == "tiny:flux", lora
        page.goto(f"{server.url}/assets/lora?view=partitions&partition={PAIR}")
        page.get_by_text("base_model", exact=True).first.wait_for()
        assert "tiny:flux" in page.inner_text("body")
        save(page, screenshots, "tiny_flux_lora_metadata", record_property)
        assert Path(lora["kohya_file"]).name == "lora_kohya_flux.safetensors"
        with safe_open(lora["diffusers_file"], framework="pt") as weights:
            assert weights.metadata().get("base_model") == "tiny:flux"
            names = list(weights.keys())  # a safetensors file handle is not iterable
        assert names and all(name.startswith("transformer.") for name in names), names[:5]
        record = json.loads((data_home / "pairs" / PAIR / "lora" / "current.json").read_text())
        assert record["version"] == lora["version"]

        # The evaluation's training table names family and base model per variant: all four are FLUX.1.
        training = metadata["evaluation"]["training_settings"]
        rows = [line for line in training.splitlines() if line.startswith("| ") and "variant" not in line]
        flux_rows = {row.split("|")[1].strip() for row in rows if "| flux | tiny:flux |" in row}
        assert flux_rows == set(VARIANTS), training
        assert "| flux | tiny:flux |" in metadata["evaluation"]["report"]
