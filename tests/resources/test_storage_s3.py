"""StorageResource with an S3 bucket (a real moto server): publish/fetch stages, specs, inbox sync, credentials."""

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from assets.partitions import character_pairs
from assets.sensors import inbox_sensor
from pipeline.errors import CastloraError, StorageError
from pipeline.spec import load_spec
from pipeline.storage.lineage import LineageRecorder, read_lineage
from pipeline.storage.manifest import read_manifest, write_manifest
from pipeline.storage.registry import scan_inbox
from pipeline.storage.remote import MARKER_NAME
from resources import StorageResource
from tests.servers.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY


def s3_storage(bucket, home, **overrides) -> StorageResource:
    fields = {
        "home": str(home),
        "s3_bucket": bucket.name,
        "s3_endpoint_url": bucket.endpoint,
        "aws_access_key_id": TEST_ACCESS_KEY,
        "aws_secret_access_key": TEST_SECRET_KEY,
        "s3_attempts": 2,
        "s3_backoff_s": 0.001,
        "s3_botocore_attempts": 1,
        **overrides,
    }
    return StorageResource(**fields)


def write_stage(storage: StorageResource, pair: str, run_id: str) -> None:
    out = storage.output_dir(pair, "references")
    (out / "red").mkdir(exist_ok=True)
    (out / "red" / "00.png").write_bytes(b"red pixels")
    write_manifest(pd.DataFrame({"character_id": ["red"], "path": [str(out / "red" / "00.png")]}), out)
    recorder = LineageRecorder(storage.layout.lineage, run_id, "references", pair, "test")
    recorder.record(out / "red" / "00.png", "ab" * 32)
    recorder.flush()


def test_published_stage_and_spec_reach_a_fresh_home(s3_bucket, tmp_path, make_pair):
    writer = s3_storage(s3_bucket, tmp_path / "writer")
    writer.register(load_spec(make_pair("a__b")))
    write_stage(writer, "a__b", "run-1")

    uris = writer.publish("run-1", "a__b", "references")

    assert uris == [f"s3://{s3_bucket.name}/castlora/pairs/a__b/references"]
    keys = s3_bucket.object_keys()
    assert {
        "castlora/pairs/a__b/pair.json",
        "castlora/pairs/a__b/references/manifest.parquet",
        "castlora/pairs/a__b/references/red/00.png",
        f"castlora/pairs/a__b/references/{MARKER_NAME}",
        "castlora/lineage/references/a__b__run-1.parquet",
    } <= set(keys)

    reader = s3_storage(s3_bucket, tmp_path / "reader")
    assert reader.spec("a__b").pair == "a__b"  # only S3 had it
    folder = reader.input_dir("a__b", "references")
    assert folder == reader.layout.stage_dir("a__b", "references")
    assert (folder / "red" / "00.png").read_bytes() == b"red pixels"
    manifest = read_manifest(folder, "references")
    assert manifest["character_id"].tolist() == ["red"]
    assert manifest["path"].tolist() == [str(folder / "red" / "00.png")]  # the reader's home, not the writer's

    # A re-materialization on another machine starts from the published version (resumable stages).
    resumed = s3_storage(s3_bucket, tmp_path / "resumer").output_dir("a__b", "references")
    assert (resumed / "red" / "00.png").read_bytes() == b"red pixels"


def test_unpublished_stage_reads_as_not_materialized(s3_bucket, tmp_path):
    reader = s3_storage(s3_bucket, tmp_path / "reader")
    with pytest.raises(CastloraError, match="materialize the 'segments' asset"):
        read_manifest(reader.input_dir("a__b", "segments"), "segments")


def test_local_only_storage_touches_no_bucket(tmp_path):
    storage = StorageResource(home=str(tmp_path / "home"))
    assert storage.remote is None
    write_stage(storage, "a__b", "run-1")
    assert storage.publish("run-1", "a__b", "references") == []
    assert storage.sync_inbox() == []
    assert len(read_lineage(storage.layout.lineage)) == 1


def test_s3_inbox_is_mirrored_and_picked_up_by_the_sensor(s3_bucket, tmp_path, make_pair):
    folder = make_pair("c__d")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"castlora/inbox/c__d/{path.relative_to(folder).as_posix()}"
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=path.read_bytes())
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="castlora/inbox/Bad Name/pair.yaml", Body=b"pair: x\n")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="castlora/inbox/e__f/e/0.jpg", Body=b"no spec yet")
    storage = s3_storage(s3_bucket, tmp_path / "home")

    problems = storage.sync_inbox()

    assert len(problems) == 1 and "Bad Name" in problems[0]
    entries = scan_inbox(storage.layout)
    assert [(e.pair_key, e.error) for e in entries] == [("c__d", None)]
    assert not (storage.layout.inbox / "e__f").exists()  # no spec file: not a pair folder yet
    assert (storage.layout.inbox / "c__d" / "c" / "00.jpg").read_bytes() == (folder / "c" / "00.jpg").read_bytes()

    with dg.instance_for_test() as instance:
        result = inbox_sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))
    assert [r.partition_key for r in result.run_requests] == ["c__d"]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["c__d"]
    assert result.dynamic_partitions_requests[0].partitions_def_name == character_pairs.name
    assert "castlora/pairs/c__d/pair.json" in s3_bucket.object_keys()  # the sensor published the spec

    # A worker with an empty disk, its data home at another path, gets the spec and the photos it names.
    storage.layout.home.rename(tmp_path / "sensor-home")
    worker = s3_storage(s3_bucket, tmp_path / "worker-home")
    worker_spec = worker.spec("c__d")
    photos = [Path(p) for c in worker_spec.characters for p in c.photos]
    assert all(p.is_file() and p.is_relative_to(worker.layout.inbox / "c__d") for p in photos)
    assert len([p for c in worker_spec.characters for p in c.photos]) == 6


def test_sensor_survives_s3_being_down(tmp_path, make_pair):
    from tests.servers.s3 import Bucket, free_port

    down = Bucket(f"http://127.0.0.1:{free_port()}", "no-such-server")
    storage = s3_storage(down, tmp_path / "home")
    with dg.instance_for_test() as instance:
        result = inbox_sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))
    assert result.run_requests == []
    assert "127.0.0.1" in result.skip_reason.skip_message and "castlora/inbox/" in result.skip_reason.skip_message
    assert TEST_SECRET_KEY not in result.skip_reason.skip_message


def test_credentials_in_the_endpoint_url_are_never_shown(tmp_path, make_pair):
    from tests.servers.s3 import Bucket, free_port

    down = Bucket(f"http://castlora-user:hunter2-secret@127.0.0.1:{free_port()}", "no-such-server")
    storage = s3_storage(down, tmp_path / "home")
    with pytest.raises(StorageError) as raised:
        storage.register(load_spec(make_pair("a__b")))
    with dg.instance_for_test() as instance:
        result = inbox_sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))
    for message in (str(raised.value), result.skip_reason.skip_message):
        assert "127.0.0.1" in message and "hunter2-secret" not in message and "castlora-user" not in message


def test_credentials_from_env_vars_are_used_and_never_shown(moto_s3_iam, tmp_path, monkeypatch):
    bucket = moto_s3_iam.create_bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # nothing for boto3's default chain to fall back on
    monkeypatch.setenv("CASTLORA_TEST_KEY_ID", moto_s3_iam.access_key_id)
    monkeypatch.setenv("CASTLORA_TEST_SECRET", moto_s3_iam.secret_access_key)
    configured = s3_storage(
        bucket,
        tmp_path / "home",
        aws_access_key_id=dg.EnvVar("CASTLORA_TEST_KEY_ID"),
        aws_secret_access_key=dg.EnvVar("CASTLORA_TEST_SECRET"),
    )
    with dg.build_resources({"storage": configured}) as resources:
        write_stage(resources.storage, "a__b", "run-1")
        resources.storage.publish("run-1", "a__b", "references")
    assert f"castlora/pairs/a__b/references/{MARKER_NAME}" in bucket.object_keys()  # the server checked signatures

    wrong_secret = "wrong-" + moto_s3_iam.secret_access_key
    monkeypatch.setenv("CASTLORA_TEST_SECRET", wrong_secret)
    with dg.build_resources({"storage": configured}) as resources, pytest.raises(StorageError) as raised:
        resources.storage.publish("run-1", "a__b", "references")
    message = str(raised.value)
    assert "SignatureDoesNotMatch" in message and bucket.endpoint in message and "AWS_SECRET_ACCESS_KEY" in message
    for secret in (wrong_secret, moto_s3_iam.secret_access_key, moto_s3_iam.access_key_id):
        assert secret not in message
