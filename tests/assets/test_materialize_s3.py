"""Materializing through Dagster with S3 storage (a real moto server that checks signatures)."""

from contextlib import ExitStack
from pathlib import Path

import dagster as dg
import pytest

from assets import pair_assets
from assets.definitions import build_resources
from assets.partitions import character_pairs
from pipeline.spec import load_spec
from pipeline.storage.remote import MARKER_NAME
from resources import CaptionerResource, StorageResource
from tests.servers.openai_api import start_chat_server
from tests.servers.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY, s3_client, start_moto

RUN_CONFIG = {"ops": {"references": {"config": {"min_side": 128}}}}
PAIR = "red__blue"


def _files_under(root):
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow  # about 15 s: references, segments and captions on the tiny preset
def test_stages_are_published_and_no_secret_appears_in_any_output(moto_s3_iam, tmp_path, make_pair, monkeypatch):
    """S3 credentials (dg.EnvVar) and the captioning API key (env) are used, and appear in no object, no file
    under the data home, no file of the Dagster instance and no event-log entry of the run."""
    bucket = moto_s3_iam.create_bucket()
    secret = moto_s3_iam.secret_access_key
    api_key = "sk-castlora-test-" + "7f3a9c" * 4
    monkeypatch.setenv("CASTLORA_TEST_OPENAI_KEY", api_key)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CASTLORA_TEST_KEY_ID", moto_s3_iam.access_key_id)
    monkeypatch.setenv("CASTLORA_TEST_SECRET", secret)
    home = tmp_path / "home"
    storage = StorageResource(
        home=str(home),
        s3_bucket=bucket.name,
        s3_endpoint_url=bucket.endpoint,
        aws_access_key_id=dg.EnvVar("CASTLORA_TEST_KEY_ID"),
        aws_secret_access_key=dg.EnvVar("CASTLORA_TEST_SECRET"),
        s3_backoff_s=0.01,
    )
    with dg.build_resources({"storage": storage}) as initialized:
        initialized.storage.register(load_spec(make_pair(PAIR)))

    with dg.instance_for_test() as instance, start_chat_server() as chat:
        instance.add_dynamic_partitions(character_pairs.name, [PAIR])
        captioner = CaptionerResource(
            backend="openai", base_url=chat.url, model="test-model", api_key_env="CASTLORA_TEST_OPENAI_KEY"
        )
        result = dg.materialize(
            [pair_assets.references, pair_assets.segments, pair_assets.captions],
            instance=instance,
            partition_key=PAIR,
            resources={**build_resources({"CASTLORA_HOME": str(home)}), "storage": storage, "captioner": captioner},
            run_config=RUN_CONFIG,
        )
        assert result.success
        assert chat.authorizations and set(chat.authorizations) == {f"Bearer {api_key}"}  # the key was used
        logs = [repr(entry) for entry in instance.all_logs(result.run_id)]
        instance_files = _files_under(Path(instance.root_directory))  # the run's sqlite event log and more
        outputs = _files_under(home) + instance_files
        leaked = [p for p in outputs for token in (secret, api_key) if token.encode() in p.read_bytes()]

    keys = set(bucket.object_keys())
    for stage in ("references", "segments", "captions"):
        prefix = f"castlora/pairs/{PAIR}/{stage}/"
        assert prefix + MARKER_NAME in keys and prefix + "manifest.parquet" in keys
        local = home / "pairs" / PAIR / stage
        published = {k[len(prefix) :] for k in keys if k.startswith(prefix)} - {MARKER_NAME}
        assert published == {p.relative_to(local).as_posix() for p in _files_under(local)}
        assert f"castlora/lineage/{stage}/{PAIR}__{result.run_id}.parquet" in keys
    assert f"castlora/pairs/{PAIR}/pair.json" in keys

    assert logs and instance_files
    assert not [k for k in keys for token in (secret, api_key) if token.encode() in bucket.read(k)]
    assert leaked == []
    assert not [line for line in logs if secret in line or api_key in line]


class StorageLosingS3(StorageResource):
    """Storage whose S3 server goes down after the inputs were read, just before the upload."""

    def publish(self, *args, **kwargs):
        _STOP_SERVER[0]()
        return super().publish(*args, **kwargs)


_STOP_SERVER = [lambda: None]


@pytest.mark.slow  # about 10 s
def test_s3_down_during_upload_fails_clearly_retries_and_marks_nothing_done(tmp_path, make_pair):
    home = tmp_path / "home"
    with ExitStack() as server:
        endpoint = server.enter_context(start_moto())
        s3_client(endpoint).create_bucket(Bucket="castlora-drill")
        _STOP_SERVER[0] = server.close
        storage = StorageLosingS3(
            home=str(home),
            s3_bucket="castlora-drill",
            s3_endpoint_url=endpoint,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            s3_attempts=3,
            s3_backoff_s=0.01,
            s3_botocore_attempts=1,
        )
        with dg.build_resources({"storage": storage}) as initialized:
            initialized.storage.register(load_spec(make_pair(PAIR)))
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(character_pairs.name, [PAIR])
            result = dg.materialize(
                [pair_assets.references],
                instance=instance,
                partition_key=PAIR,
                resources={**build_resources({"CASTLORA_HOME": str(home)}), "storage": storage},
                run_config=RUN_CONFIG,
                raise_on_error=False,
            )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.user_failure_data.description
    assert endpoint in message and "castlora-drill" in message and "after 3 attempt(s)" in message
    assert f"s3://castlora-drill/castlora/pairs/{PAIR}/references is NOT marked done" in message
    assert TEST_SECRET_KEY not in message
    assert not result.get_asset_materialization_events()
    assert (home / "pairs" / PAIR / "references" / "manifest.parquet").is_file()  # the local work is kept
