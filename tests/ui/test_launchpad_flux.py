"""A new user tries FLUX.1 from the UI: register the sample pair, open the job's launchpad, pick the pair's
partition, change the models resource's ``preset`` to ``tiny-flux`` in the config editor, launch, and every
asset materializes for FLUX.1 (docs/design.md#flux1).

Slow (minutes on an idle 2-core machine; 18 minutes when six jobs shared those cores): its own data home and
``dagster dev`` (not the shared demo's), so it needs no SDXL demo run. The run uses the launchpad's defaults, as a
user's first run would, on the in-process executor: on a small CPU machine the default multiprocess executor starts
one Python process per step (one per asset and check here), which costs more than the tiny models' work.
Screenshots go where tests/ui/conftest.py says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.ui.conftest import open_page
from tests.ui.dagster_dev import REPO, DagsterDev
from tests.ui.launchpad import (
    JOB_ASSETS,
    castlora_cli,
    editor_text,
    latest_metadata,
    launch,
    open_launchpad,
    save,
    served_home,
    wait_for_run,
)

pytestmark = pytest.mark.slow

PAIR = "dog6__dog2"
SAMPLE = REPO / "samples" / PAIR
VARIANTS = ("dreambooth", "segmix", "segmix_init", "iterative")
RUN_TIMEOUT_S = 1800  # about 3 minutes on an idle 2-core machine; shared CI machines are far slower


@pytest.fixture(scope="module")
def flux_ui(tmp_path_factory) -> Iterator[tuple[DagsterDev, Path]]:
    """A fresh data home with the sample pair registered the documented way (``castlora register``), served by
    ``dagster dev``; yields the server and the data home."""
    data_home = tmp_path_factory.mktemp("flux_ui") / "home"
    castlora_cli(data_home, "register", str(SAMPLE))
    with served_home(data_home, tmp_path_factory.mktemp("dagster_dev_flux") / "dagster_dev.log") as server:
        yield server, data_home


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
    return editor_text(page)


def test_launchpad_tiny_flux_materializes(flux_ui, browser, screenshots, record_property):
    server, data_home = flux_ui
    with open_page(browser, server.url) as page:
        # Jobs → castlora_pair → the launchpad, with the registered pair picked as the partition.
        open_launchpad(page, server, PAIR)

        config = set_preset_in_editor(page, "tiny-flux")
        assert re.search(r"^      preset: '?tiny-flux'?$", config, re.MULTILINE), config[-1500:]
        page.get_by_text("No errors").wait_for()
        save(page, screenshots, "launchpad_tiny_flux", record_property)
        run_id = launch(page)

        run = wait_for_run(server, run_id, RUN_TIMEOUT_S)
        assert run["status"] == "SUCCESS", f"run {run_id} ended {run['status']}:\n{server.log_tail()}"
        assert re.search(r"preset: '?tiny-flux'?", run["runConfigYaml"]), run["runConfigYaml"]
        assert {"key": "dagster/partition", "value": PAIR} in run["tags"]
        page.reload()
        page.get_by_text("Success", exact=True).first.wait_for()
        save(page, screenshots, "tiny_flux_run_succeeded", record_property)

        # Every asset of the job materialized for the pair in this run.
        metadata = {}
        for asset in JOB_ASSETS:
            materialized_in, metadata[asset] = latest_metadata(server, asset, PAIR)
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
