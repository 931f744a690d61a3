"""Asset checks: problems a person should see next to the asset, per pair."""

import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from PIL import Image

from assets.metadata import table_md, user_errors
from assets.pair_assets import references, segments, segmix_bank
from assets.partitions import DNC_HEADLINE, character_pairs, latest_materializations
from assets.quality_assets import evaluation
from assets.training_assets import lora
from pipeline.errors import CastloraError
from pipeline.images import IntakeConfig
from pipeline.lora.record import LORA_FILE_KINDS
from pipeline.lora.verify import verify_lora_file
from pipeline.segment import STATUS_OK
from pipeline.stage_names import Stage
from pipeline.stages.lora import current_lora
from pipeline.storage.manifest import read_manifest
from resources import StorageResource
from resources.storage import pair_key

# How far the headline D&C of a variant may fall below the previous evaluation before the check fails.
DNC_REGRESSION_TOLERANCE = 0.05

# Partitioned asset checks are "preview" in Dagster 1.13 but needed (docs/design.md#dagster-layer); keep logs quiet.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def _segments_manifest(context: dg.AssetCheckExecutionContext, storage: StorageResource):
    return read_manifest(storage.input_dir(pair_key(context), Stage.SEGMENTS), Stage.SEGMENTS)


@dg.asset_check(asset=segments, partitions_def=character_pairs, description="Every photo has a usable mask.")
@user_errors
def segments_found(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    manifest = _segments_manifest(context, storage)
    flagged = manifest[manifest["status"] != STATUS_OK]
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
    usable = manifest[manifest["status"] == STATUS_OK].groupby("character_id").size()
    counts = {cid: int(usable.get(cid, 0)) for cid in manifest["character_id"].unique()}
    missing = [cid for cid, n in counts.items() if n == 0]
    return dg.AssetCheckResult(
        passed=not missing,
        description=f"No usable cut-out for {missing}" if missing else None,
        metadata={"usable_per_character": dg.MetadataValue.json(counts)},
    )


@dg.asset_check(
    asset=references,
    partitions_def=character_pairs,
    blocking=True,
    description="Every character keeps enough usable reference photos (none: blocks; fewer than recommended: warns).",
)
@user_errors
def enough_references(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    pair = pair_key(context)
    manifest = read_manifest(storage.input_dir(pair, Stage.REFERENCES), Stage.REFERENCES)
    counts = manifest.groupby("character_id").size()
    per_character = {c.id: int(counts.get(c.id, 0)) for c in storage.spec(pair).characters}
    recommended = IntakeConfig().min_photos
    empty = [cid for cid, n in per_character.items() if n == 0]
    few = [cid for cid, n in per_character.items() if 0 < n < recommended]
    if empty:
        description = f"No usable reference photo for {empty}: nothing to learn these characters from."
    elif few:
        description = f"Fewer than {recommended} usable photos for {few}: identity will be weak; add photos."
    else:
        description = None
    return dg.AssetCheckResult(
        passed=not (empty or few),
        severity=dg.AssetCheckSeverity.ERROR if empty else dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={"per_character": dg.MetadataValue.json(per_character), "recommended": recommended},
    )


@dg.asset_check(
    asset=segments,
    partitions_def=character_pairs,
    blocking=True,
    description="Every usable mask file exists and has foreground pixels (an empty mask makes an empty cut-out).",
)
@user_errors
def masks_not_empty(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    manifest = _segments_manifest(context, storage)
    usable = manifest[manifest["status"] == STATUS_OK]
    problems = []
    for row in usable.itertuples():
        path = row.mask_path
        try:
            foreground = int(np.count_nonzero(np.asarray(Image.open(path).convert("L")) > 127))
        except (OSError, ValueError) as exc:
            problems.append({"source": row.source, "mask": str(path), "problem": f"unreadable: {exc}"})
            continue
        if foreground == 0:
            problems.append({"source": row.source, "mask": str(path), "problem": "no foreground pixels"})
    return dg.AssetCheckResult(
        passed=not problems,
        description=f"{len(problems)} usable mask(s) missing or empty; re-materialize 'segments'."
        if problems
        else None,
        metadata={"checked": len(usable), "problems": table_md(pd.DataFrame(problems))},
    )


@dg.asset_check(
    asset=segmix_bank,
    partitions_def=character_pairs,
    blocking=True,
    description="The Seg-Mix bank holds instance composites whose image and mask files exist.",
)
@user_errors
def bank_not_empty(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    manifest = read_manifest(storage.input_dir(pair_key(context), Stage.SEGMIX_BANK), Stage.SEGMIX_BANK)
    instance = manifest[manifest["kind"] == "instance"]
    missing = [
        path
        for row in instance.itertuples()
        for path in [row.image_path, row.union_mask_path, *row.mask_paths]
        if not Path(path).is_file()
    ]
    passed = len(instance) > 0 and not missing
    if instance.empty:
        description = "The bank has no instance composites: Seg-Mix training would have nothing to sample."
    elif missing:
        description = f"{len(missing)} bank file(s) missing, e.g. {missing[0]}; re-materialize 'segmix_bank'."
    else:
        description = None
    kinds = {str(k): int(v) for k, v in manifest["kind"].value_counts().items()}
    return dg.AssetCheckResult(
        passed=passed, description=description, metadata={"composites": dg.MetadataValue.json(kinds)}
    )


@dg.asset_check(
    asset=lora,
    partitions_def=character_pairs,
    blocking=True,
    description="Both exported LoRA files (diffusers, kohya) load, match their recorded hashes and hold finite values.",
)
@user_errors
def lora_file_loads(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    current = current_lora(storage.input_dir(pair_key(context), Stage.LORA))  # refuses a record lacking a file
    modules, problems = {}, []
    for file_format in LORA_FILE_KINDS:
        try:
            report = verify_lora_file(current.files[file_format], file_format, current.sha256[file_format])
            modules[file_format] = report.modules
        except CastloraError as exc:
            problems.append(str(exc))
    if not problems and len(set(modules.values())) != 1:
        problems.append(f"The two files hold different numbers of LoRA modules: {modules}.")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={"version": current.version, "modules": dg.MetadataValue.json(modules)},
    )


def _headline(materialization: dg.AssetMaterialization) -> dict | None:
    value = materialization.metadata.get(DNC_HEADLINE)
    return getattr(value, "value", None)


@dg.asset_check(
    asset=evaluation,
    partitions_def=character_pairs,
    description=f"Headline D&C per variant did not drop more than {DNC_REGRESSION_TOLERANCE} below the previous "
    "evaluation of this pair.",
)
def dnc_not_regressed(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    pair = pair_key(context)
    newest = latest_materializations(context.instance, evaluation.key, pair, limit=2)
    current = _headline(newest[0]) if newest else None
    previous = _headline(newest[1]) if len(newest) > 1 else None
    if current is None:
        return dg.AssetCheckResult(passed=False, description="This evaluation recorded no D&C value to compare.")
    if previous is None or previous.get("metric") != current.get("metric"):
        return dg.AssetCheckResult(
            passed=True,
            description="No earlier evaluation with the same D&C metric: nothing to compare yet.",
            metadata={"current": dg.MetadataValue.json(current)},
        )
    drops = {
        variant: round(previous["values"][variant] - value, 4)
        for variant, value in current["values"].items()
        if variant in previous["values"] and previous["values"][variant] - value > DNC_REGRESSION_TOLERANCE
    }
    return dg.AssetCheckResult(
        passed=not drops,
        description=f"D&C ({current['metric']}) fell for {sorted(drops)} by {drops}." if drops else None,
        metadata={"current": dg.MetadataValue.json(current), "previous": dg.MetadataValue.json(previous)},
    )
