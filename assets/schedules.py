"""The retraining schedule: on a cron, re-materialize only the pairs that are stale.

A pair is stale when one of its assets was never materialized (or last failed before materializing), when an
asset's code version differs from the one its latest materialization was made with, or when the spec or the
bytes of its photos changed since ``references`` last ran. Everything else is left alone, so a weekly
schedule over a hundred pairs retrains the two whose photos were edited, not all hundred.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass

import dagster as dg

from assets.jobs import PAIR_ASSETS, pair_job
from assets.partitions import REFERENCES_FINGERPRINT, character_pairs, latest_materializations
from pipeline.errors import CastloraError
from pipeline.stage_names import Stage
from pipeline.storage.registry import references_fingerprint
from resources import StorageResource

RETRAIN_CRON_ENV = "CASTLORA_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00: GPUs are usually idle then
CODE_VERSION_TAG = "dagster/code_version"


@dataclass(frozen=True)
class Staleness:
    pair: str
    reasons: tuple[str, ...]

    @property
    def stale(self) -> bool:
        return bool(self.reasons)


def code_versions() -> dict[dg.AssetKey, str]:
    """The code version each castlora asset declares today."""
    versions: dict[dg.AssetKey, str] = {}
    for assets_def in PAIR_ASSETS:
        for key, version in assets_def.code_versions_by_key.items():
            versions[key] = version or ""
    return versions


def pair_staleness(
    instance: dg.DagsterInstance, storage: StorageResource, pair: str, versions: Mapping[dg.AssetKey, str]
) -> Staleness:
    reasons: list[str] = []
    for key, version in sorted(versions.items(), key=lambda item: item[0].to_user_string()):
        found = latest_materializations(instance, key, pair)
        name = key.to_user_string()
        if not found:
            reasons.append(f"{name}: never materialized")
            continue
        latest = found[0]
        made_with = (latest.tags or {}).get(CODE_VERSION_TAG)
        if made_with != version:
            reasons.append(f"{name}: code version {made_with} -> {version}")
        if name == Stage.REFERENCES:
            recorded = latest.metadata.get(REFERENCES_FINGERPRINT)
            recorded_value = getattr(recorded, "value", recorded)
            try:
                current = references_fingerprint(storage.spec(pair))
            except CastloraError as exc:
                reasons.append(f"references: spec unreadable ({exc})")
                continue
            if recorded_value != current:
                reasons.append(f"references: spec or photos changed ({recorded_value} -> {current})")
    return Staleness(pair, tuple(reasons))


def stale_pairs(instance: dg.DagsterInstance, storage: StorageResource) -> list[Staleness]:
    versions = code_versions()
    pairs = instance.get_dynamic_partitions(character_pairs.name)
    return [s for s in (pair_staleness(instance, storage, pair, versions) for pair in sorted(pairs)) if s.stale]


@dg.schedule(
    job=pair_job,
    cron_schedule=os.environ.get(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=(
        "Retrains stale pairs only: changed photos/spec or a changed asset code version. "
        f"Cron from ${RETRAIN_CRON_ENV} (default '{DEFAULT_RETRAIN_CRON}')."
    ),
)
def retrain_schedule(context: dg.ScheduleEvaluationContext, storage: StorageResource):
    stale = stale_pairs(context.instance, storage)
    if not stale:
        return dg.SkipReason("Every pair is up to date (photos, spec and code versions unchanged).")
    tick = context.scheduled_execution_time
    requests = []
    for item in stale:
        context.log.info(f"{item.pair} is stale: {'; '.join(item.reasons)}")
        # One run per pair and tick; the reasons go on the run so the UI says why it was retrained.
        requests.append(
            dg.RunRequest(
                run_key=f"{item.pair}:{tick.isoformat() if tick else 'manual'}",
                partition_key=item.pair,
                tags={"castlora/retrain_reason": "; ".join(item.reasons)[:1000]},
            )
        )
    return requests
