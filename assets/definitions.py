"""The code location: ``dagster dev -m assets.definitions`` (or workspace.yaml) loads ``defs``.

Resources are configured from environment variables so the same code runs the offline demo and a real
deployment: CASTLORA_HOME, CASTLORA_PRESET, CASTLORA_SEGMENTER, CASTLORA_DEVICE, CASTLORA_CAPTIONER,
CASTLORA_CAPTION_MODEL, CASTLORA_CAPTION_BASE_URL, CASTLORA_TRAIN_PROCESSES. Every field can also be changed per
run in the launchpad.
"""

from __future__ import annotations

import os

import dagster as dg

from assets import checks, schedules, sensors
from assets.executors import executor_from_env
from assets.instance import env_int
from assets.jobs import PAIR_ASSETS, pair_job
from pipeline.errors import CastloraError
from pipeline.models.presets import get_preset
from resources import CaptionerResource, ModelResource, StorageResource


def _preset_from_env(env: dict[str, str]) -> str:
    """``CASTLORA_PRESET`` (default ``tiny``), refused by name when it is no preset (not a bare pydantic error)."""
    value = env.get("CASTLORA_PRESET", "tiny")
    try:
        return get_preset(value).name
    except CastloraError as exc:
        raise CastloraError(f"CASTLORA_PRESET={value!r}: {exc}") from None


def build_resources(env: dict[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    env = dict(os.environ if env is None else env)
    return {
        # S3 credentials are not read here: empty means boto3's chain (AWS_ACCESS_KEY_ID/SECRET, roles, profiles),
        # so they never pass through Dagster config; set them with dg.EnvVar when a resource needs its own.
        "storage": StorageResource(
            home=env.get("CASTLORA_HOME", ""),
            s3_bucket=env.get("CASTLORA_S3_BUCKET", ""),
            s3_prefix=env.get("CASTLORA_S3_PREFIX", "castlora"),
            s3_endpoint_url=env.get("CASTLORA_S3_ENDPOINT_URL", ""),
            s3_region=env.get("AWS_REGION", "us-east-1"),
        ),
        "models": ModelResource(
            preset=_preset_from_env(env),
            segmenter_backend=env.get("CASTLORA_SEGMENTER") or None,
            device=env.get("CASTLORA_DEVICE", "auto"),
            train_processes=env_int(env, "CASTLORA_TRAIN_PROCESSES", 1),
        ),
        "captioner": CaptionerResource(
            backend=env.get("CASTLORA_CAPTIONER", "template"),
            model=env.get("CASTLORA_CAPTION_MODEL", ""),
            base_url=env.get("CASTLORA_CAPTION_BASE_URL", ""),
        ),
    }


defs = dg.Definitions(
    assets=PAIR_ASSETS,
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    sensors=[sensors.inbox_sensor],
    schedules=[schedules.retrain_schedule],
    jobs=[pair_job],
    resources=build_resources(),
    # multiprocess unless CASTLORA_EXECUTOR says otherwise (k8s: one pod per step, see assets/executors.py).
    executor=executor_from_env(),
)
