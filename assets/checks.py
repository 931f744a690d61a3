"""Asset checks: problems a person should see next to the asset, per pair."""

import warnings

import dagster as dg

from assets.metadata import table_md, user_errors
from assets.pair_assets import segments
from assets.partitions import character_pairs, pair_key
from pipeline.manifest import read_manifest
from pipeline.stages.segments import USABLE
from resources import StorageResource

# Partitioned asset checks are "preview" in Dagster 1.13 but are what SPEC §10 prescribes; keep logs quiet.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def _segments_manifest(context: dg.AssetCheckExecutionContext, storage: StorageResource):
    return read_manifest(storage.stage_dir(pair_key(context), "segments"), "segments")


@dg.asset_check(asset=segments, partitions_def=character_pairs, description="Every photo has a usable mask.")
@user_errors
def segments_found(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    manifest = _segments_manifest(context, storage)
    flagged = manifest[manifest["status"] != USABLE]
    return dg.AssetCheckResult(
        passed=flagged.empty,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            None
            if flagged.empty
            else f"{len(flagged)} photo(s) with no detection or a tiny mask: add hand-made masks for them."
        ),
        metadata={
            "flagged": len(flagged),
            "photos": table_md(flagged[["character_id", "source", "status", "mask_fraction"]]),
        },
    )


@dg.asset_check(
    asset=segments,
    partitions_def=character_pairs,
    blocking=True,
    description="Each character keeps at least one usable cut-out, or Seg-Mix has nothing to compose.",
)
@user_errors
def every_character_segmented(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    manifest = _segments_manifest(context, storage)
    usable = manifest[manifest["status"] == USABLE].groupby("character_id").size()
    counts = {cid: int(usable.get(cid, 0)) for cid in manifest["character_id"].unique()}
    missing = [cid for cid, n in counts.items() if n == 0]
    return dg.AssetCheckResult(
        passed=not missing,
        description=f"No usable cut-out for {missing}" if missing else None,
        metadata={"usable_per_character": dg.MetadataValue.json(counts)},
    )
