"""The code location: ``dagster dev -m assets.definitions`` (or workspace.yaml) loads ``defs``.

Resources are configured from environment variables so the same code runs the offline demo and a real
deployment: CASTLORA_HOME, CASTLORA_PRESET, CASTLORA_SEGMENTER, CASTLORA_DEVICE, CASTLORA_CAPTIONER,
CASTLORA_CAPTION_MODEL, CASTLORA_CAPTION_BASE_URL. Every field can also be changed per run in the launchpad.
"""

from __future__ import annotations

import os

import dagster as dg

from assets import checks, pair_assets, quality_assets, sensors, training_assets
from assets.jobs import pair_job
from resources import CaptionerResource, ModelResource, StorageResource


def build_resources(env: dict[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    env = dict(os.environ if env is None else env)
    return {
        "storage": StorageResource(home=env.get("CASTLORA_HOME", "")),
        "models": ModelResource(
            preset=env.get("CASTLORA_PRESET", "tiny"),
            segmenter_backend=env.get("CASTLORA_SEGMENTER", ""),
            device=env.get("CASTLORA_DEVICE", "auto"),
        ),
        "captioner": CaptionerResource(
            backend=env.get("CASTLORA_CAPTIONER", "template"),
            model=env.get("CASTLORA_CAPTION_MODEL", ""),
            base_url=env.get("CASTLORA_CAPTION_BASE_URL", ""),
        ),
    }


defs = dg.Definitions(
    assets=dg.load_assets_from_modules([pair_assets, training_assets, quality_assets]),
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    sensors=[sensors.inbox_sensor],
    jobs=[pair_job],
    resources=build_resources(),
)
