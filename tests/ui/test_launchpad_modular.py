"""A new user tries modular customization from the UI with a pair made only of two character LoRA files: write the
example pair (``castlora example-lora-pair``), register it (``castlora register``), open the job's launchpad, pick
the pair's partition, shrink the run in the config editor, launch, and every asset materializes; the ``lora``
asset is the merge fine-tuned with Seg-Mix and the evaluation compares naive_merge, merged and merged_segmix
(docs/design.md#modular-customization).

Slow (its own data home and ``dagster dev``, no SDXL demo run needed). The small settings are pasted over the
launchpad's scaffold as a user pastes them; the evaluation keeps its default variants, so the test also shows
that a pair of LoRA files gets the modular variants without asking. Screenshots go where tests/ui/conftest.py says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.lora.example_pair import EXAMPLE_PAIR
from tests.ui.conftest import open_page
from tests.ui.dagster_dev import DagsterDev
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

MODULAR_VARIANTS = ("naive_merge", "merged", "merged_segmix")
RUN_TIMEOUT_S = 1800
PROMPT = "zorp ball and quix ball on a beach"
# The fewest images, steps and pixels that still run every stage (64 px, 1-2 steps).
SMALL = {
    "ops": {
        "character_images": {"config": {"images_per_character": 3, "steps": 1, "resolution": 64}},
        "references": {"config": {"min_side": 64}},
        "class_images": {"config": {"count": 2, "resolution": 64, "steps": 1}},
        "segmix_bank": {"config": {"n_instance": 4, "n_prior": 0, "canvas_width": 64, "canvas_height": 64}},
        # For a pair of LoRA files, finetune_steps replaces steps (rank and alpha are the merge's).
        "lora": {"config": {"resolution": 64, "merge_method": "concat", "finetune_steps": 2}},
        "samples": {"config": {"prompts": [PROMPT], "seeds": [0], "steps": 1, "resolution": 64}},
        "iteration": {"config": {"images_per_round": 2, "keep_top": 2, "train_steps": 1, "max_rounds": 1,
                                 "inference_steps": 1, "resolution": 64, "prompts": [PROMPT]}},
        "evaluation": {"config": {"prompts": [PROMPT], "seeds": [7], "inference_steps": 1, "resolution": 64}},
    }
}  # fmt: skip


def merged(base: dict, small: dict) -> dict:
    """``base`` with ``small``'s values put in at their places (nested dicts merged, other values replaced)."""
    out = dict(base)
    for key, value in small.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def modular_ui(tmp_path_factory) -> Iterator[tuple[DagsterDev, Path]]:
    """A fresh data home with the example pair of two LoRA files written and registered the documented way,
    served by ``dagster dev``; yields the server and the data home."""
    root = tmp_path_factory.mktemp("modular_ui")
    data_home, folder = root / "home", root / "zorp__quix"
    castlora_cli(data_home, "example-lora-pair", str(folder))
    assert not list(folder.rglob("*.jpg")), "the example pair has no photos"
    castlora_cli(data_home, "register", str(folder))
    with served_home(data_home, root / "dagster_dev.log") as server:
        yield server, data_home


def test_launchpad_pair_of_two_lora_files_materializes(modular_ui, browser, screenshots, record_property):
    server, data_home = modular_ui
    with open_page(browser, server.url) as page:
        open_launchpad(page, server, EXAMPLE_PAIR)
        scaffold = yaml.safe_load(editor_text(page))
        # The scaffold offers the modular settings with their defaults (the user sees what a merge does).
        lora_defaults = scaffold["ops"]["lora"]["config"]
        assert lora_defaults["merge_method"] == "gradient_fusion" and lora_defaults["finetune_steps"] == 250
        assert scaffold["ops"]["character_images"]["config"]["images_per_character"] == 5
        config = yaml.safe_dump(merged(scaffold, SMALL), sort_keys=False)
        page.locator(".CodeMirror").first.evaluate("(element, text) => element.CodeMirror.setValue(text)", config)
        save(page, screenshots, "launchpad_modular", record_property)
        run_id = launch(page)

        run = wait_for_run(server, run_id, RUN_TIMEOUT_S)
        assert run["status"] == "SUCCESS", f"run {run_id} ended {run['status']}:\n{server.log_tail()}"
        assert {"key": "dagster/partition", "value": EXAMPLE_PAIR} in run["tags"]
        page.reload()
        page.get_by_text("Success", exact=True).first.wait_for()
        save(page, screenshots, "modular_run_succeeded", record_property)

        metadata = {}
        for asset in JOB_ASSETS:
            materialized_in, metadata[asset] = latest_metadata(server, asset, EXAMPLE_PAIR)
            assert materialized_in == run_id, f"{asset}: latest materialization from run {materialized_in}"
        assert metadata["character_images"]["images"] == "6"  # 3 rendered per character LoRA

        # The pair's LoRA is the concat merge fine-tuned with Seg-Mix: its metadata says so, in the UI too.
        lora = metadata["lora"]
        assert lora["merge_method"] == "concat" and lora["steps"] == "2", lora  # the fine-tune's finetune_steps
        page.goto(f"{server.url}/assets/lora?view=partitions&partition={EXAMPLE_PAIR}")
        page.get_by_text("merge_method", exact=True).first.wait_for()
        assert "concat" in page.inner_text("body")
        save(page, screenshots, "modular_lora_metadata", record_property)
        record = json.loads((data_home / "pairs" / EXAMPLE_PAIR / "lora" / "current.json").read_text())
        assert record["version"] == lora["version"]

        # The evaluation's default variants include the three modular ones, and its report shows them.
        report = metadata["evaluation"]["report"]
        for variant in MODULAR_VARIANTS:
            assert variant in report, report[:3000]
        training = metadata["evaluation"]["training_settings"]
        rows = [line for line in training.splitlines() if line.startswith("| ")]
        merges = [row for row in rows if row.split("|")[1].strip() in ("naive_merge", "merged")]
        assert len(merges) == 2 and all("not trained: the character LoRA files merged" in m for m in merges), training
        page.goto(f"{server.url}/assets/evaluation?view=partitions&partition={EXAMPLE_PAIR}")
        page.get_by_text("report", exact=True).first.wait_for()
        save(page, screenshots, "modular_evaluation", record_property)
