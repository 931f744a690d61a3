"""The inbox sensor: a pair folder with a spec file becomes a partition and a run."""

import dagster as dg

from assets.jobs import pair_job
from assets.partitions import character_pairs
from pipeline.errors import StorageError
from pipeline.storage.registry import scan_inbox, spec_fingerprint
from resources import StorageResource


@dg.sensor(
    job=pair_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers pair folders dropped into <data home>/inbox/ (or the S3 prefix's inbox/) and materializes "
    "them.",
)
def inbox_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    skipped: list[str] = []
    try:
        # An S3 inbox is mirrored into the local one first; if S3 is down, the local inbox still counts.
        for problem in storage.sync_inbox():
            context.log.error(f"Inbox entry skipped: {problem}")
            skipped.append(problem)
    except StorageError as exc:
        context.log.error(f"S3 inbox not synced: {exc}")
        skipped.append(str(exc))
    entries = scan_inbox(storage.layout)
    known = set(context.instance.get_dynamic_partitions(character_pairs.name))
    new_keys: list[str] = []
    run_requests: list[dg.RunRequest] = []
    for entry in entries:
        if entry.spec is None:
            # One bad folder must not stop the others: log it and carry on.
            context.log.error(f"Inbox folder {entry.folder} skipped: {entry.error}")
            skipped.append(f"{entry.folder.name}: {entry.error}")
            continue
        try:
            storage.register(entry.spec)  # with S3, publishes the spec so every worker can read it
        except Exception as exc:  # one folder that cannot be registered must not stop the others
            context.log.error(f"Inbox folder {entry.folder} not registered: {type(exc).__name__}: {exc}")
            skipped.append(f"{entry.folder.name}: not registered ({type(exc).__name__}: {str(exc)[:300]})")
            continue
        if entry.pair_key not in known:
            new_keys.append(entry.pair_key)
        # The run key changes with the spec and photo list, so edits re-run the pair and repeats do not.
        run_requests.append(
            dg.RunRequest(run_key=f"{entry.pair_key}:{spec_fingerprint(entry.spec)}", partition_key=entry.pair_key)
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[character_pairs.build_add_request(new_keys)] if new_keys else [],
        skip_reason=dg.SkipReason("; ".join(skipped)) if skipped and not run_requests else None,
    )
