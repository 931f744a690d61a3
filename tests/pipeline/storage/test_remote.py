"""pipeline.storage.remote against a real moto S3 server: key safety, publish/fetch, marker written last, retries."""

import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from pipeline.errors import PairKeyError, StorageError
from pipeline.storage.hashing import sha256_file
from pipeline.storage.remote import MARKER_NAME, RetryPolicy, S3Location, S3Store, boto3_client_factory, s3_key
from tests.servers.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port


def make_store(bucket, endpoint=None, client_factory=None, attempts=3) -> S3Store:
    location = S3Location(bucket.name, "castlora", endpoint or bucket.endpoint, "us-east-1")
    factory = client_factory or boto3_client_factory(location, TEST_ACCESS_KEY, TEST_SECRET_KEY, botocore_attempts=1)
    sleeps: list[float] = []
    store = S3Store(location, factory, RetryPolicy(attempts, 0.001, 0.01), (TEST_SECRET_KEY,), sleep=sleeps.append)
    store.sleeps = sleeps  # type: ignore[attr-defined]
    return store


def stage_folder(root, files: dict[str, bytes]):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {"manifest.parquet": b"table" * 100, "red/00.png": b"png-red", "blue/00.png": b"png-blue", "b/c/d.txt": b"x"}


class Wrapped:
    """A real boto3 client with failures injected into chosen calls."""

    def __init__(self, real, fail_put_on=None, connection_errors=0):
        self.real, self.fail_put_on, self.connection_errors = real, fail_put_on, connection_errors
        self.puts: list[str] = []
        self.calls = 0

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(**kwargs):
            self.calls += 1
            if self.connection_errors > 0:
                self.connection_errors -= 1
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
            if name == "put_object":
                self.puts.append(kwargs["Key"])
                if self.fail_put_on is not None and len(self.puts) == self.fail_put_on:
                    error = {"Error": {"Code": "AccessDenied", "Message": "injected"}, "ResponseMetadata": {}}
                    raise ClientError({**error, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
            return method(**kwargs)

        return call


def test_keys_stay_under_the_prefix():
    assert s3_key("castlora", "pairs/a__b/references", "red/00.png") == "castlora/pairs/a__b/references/red/00.png"
    assert s3_key("/team/castlora/", "lineage") == "team/castlora/lineage"
    assert s3_key("", "inbox") == "inbox"


@pytest.mark.parametrize("part", ["..", "a/../b", "/etc/passwd", "a\\b", "", "a//b", ".", "x/.", "a\x00b"])
def test_unsafe_key_parts_are_refused(part):
    with pytest.raises(PairKeyError):
        s3_key("castlora", "pairs", part)


def test_unsafe_prefix_is_refused():
    with pytest.raises(PairKeyError):
        s3_key("castlora/../other", "inbox")
    with pytest.raises(PairKeyError):
        S3Location("bucket", prefix="a/../b")


def test_publish_then_fetch_round_trip(s3_bucket, tmp_path):
    local = stage_folder(tmp_path / "out", {**FILES, ".tmp-half.png": b"half-written"})
    store = make_store(s3_bucket)
    assert not store.is_published("pairs/a__b/references")

    marker = store.publish_tree(local, "pairs/a__b/references")

    assert store.is_published("pairs/a__b/references")
    listed = {e["name"]: e for e in marker["files"]}
    assert set(listed) == set(FILES)  # the interrupted temporary file is not published
    assert listed["red/00.png"]["sha256"] == sha256_file(local / "red/00.png")
    assert f"castlora/pairs/a__b/references/{MARKER_NAME}" in s3_bucket.object_keys()
    stored = json.loads(s3_bucket.read(f"castlora/pairs/a__b/references/{MARKER_NAME}"))
    assert stored["files"] == marker["files"]

    fresh = tmp_path / "fresh"
    result = store.fetch_tree("pairs/a__b/references", fresh)
    assert sorted(result.downloaded) == sorted(FILES) and result.reused == []
    assert {n: (fresh / n).read_bytes() for n in FILES} == FILES
    assert not (fresh / ".tmp-half.png").exists()

    # A second fetch keeps identical files and repairs a changed one.
    (fresh / "red/00.png").write_bytes(b"tampered")
    again = store.fetch_tree("pairs/a__b/references", fresh)
    assert again.downloaded == ["red/00.png"] and len(again.reused) == len(FILES) - 1
    assert (fresh / "red/00.png").read_bytes() == FILES["red/00.png"]


def test_marker_is_written_last_and_unchanged_files_are_not_uploaded_again(s3_bucket, tmp_path):
    local = stage_folder(tmp_path / "out", FILES)
    wrapped = {}

    def factory():
        wrapped["client"] = Wrapped(boto3_client_factory(location, TEST_ACCESS_KEY, TEST_SECRET_KEY)())
        return wrapped["client"]

    location = S3Location(s3_bucket.name, "castlora", s3_bucket.endpoint)
    store = make_store(s3_bucket, client_factory=factory)
    store.publish_tree(local, "pairs/a__b/segments")
    puts = wrapped["client"].puts
    assert puts[-1].endswith(MARKER_NAME) and len(puts) == len(FILES) + 1

    (local / "red/00.png").write_bytes(b"new red")
    puts.clear()
    store.publish_tree(local, "pairs/a__b/segments")
    assert puts == ["castlora/pairs/a__b/segments/red/00.png", f"castlora/pairs/a__b/segments/{MARKER_NAME}"]


def test_failure_mid_publish_leaves_the_folder_not_done(s3_bucket, tmp_path):
    local = stage_folder(tmp_path / "out", FILES)
    location = S3Location(s3_bucket.name, "castlora", s3_bucket.endpoint)
    make_store(s3_bucket).publish_tree(local, "pairs/a__b/segments")  # an earlier, complete version

    # Republish changed files; the 2nd upload fails for good.
    for name in FILES:
        (local / name).write_bytes(b"v2 " + FILES[name])
    client = Wrapped(boto3_client_factory(location, TEST_ACCESS_KEY, TEST_SECRET_KEY)(), fail_put_on=2)
    store = make_store(s3_bucket, client_factory=lambda: client)
    with pytest.raises(StorageError, match="AccessDenied"):
        store.publish_tree(local, "pairs/a__b/segments")

    assert len(client.puts) == 2 and not any(k.endswith(MARKER_NAME) for k in client.puts)
    assert f"castlora/pairs/a__b/segments/{MARKER_NAME}" not in s3_bucket.object_keys()
    assert not store.is_published("pairs/a__b/segments")
    with pytest.raises(StorageError, match="not published or incomplete"):
        store.fetch_tree("pairs/a__b/segments", tmp_path / "reader")
    assert not (tmp_path / "reader").exists()


def test_transient_connection_errors_are_retried(s3_bucket, tmp_path):
    local = stage_folder(tmp_path / "out", {"a.txt": b"hello"})
    location = S3Location(s3_bucket.name, "castlora", s3_bucket.endpoint)
    client = Wrapped(boto3_client_factory(location, TEST_ACCESS_KEY, TEST_SECRET_KEY)(), connection_errors=2)
    store = make_store(s3_bucket, client_factory=lambda: client, attempts=3)

    store.upload_file(local / "a.txt", "lineage/a.txt")

    assert s3_bucket.read("castlora/lineage/a.txt") == b"hello"
    assert store.sleeps == [0.001, 0.002]  # backoff doubles between attempts

    # One failure more than the attempts allow: a clear error with the attempt count.
    client.connection_errors = 3
    with pytest.raises(StorageError, match=r"after 3 attempt\(s\)"):
        store.upload_file(local / "a.txt", "lineage/b.txt")
    assert "castlora/lineage/b.txt" not in s3_bucket.object_keys()


def test_endpoint_down_gives_a_clear_error_and_marks_nothing_done(s3_bucket, tmp_path):
    local = stage_folder(tmp_path / "out", FILES)
    closed = f"http://127.0.0.1:{free_port()}"
    store = make_store(s3_bucket, endpoint=closed, attempts=2)

    with pytest.raises(StorageError) as raised:
        store.publish_tree(local, "pairs/a__b/references")

    message = str(raised.value)
    assert closed in message and s3_bucket.name in message
    assert "castlora/pairs/a__b/references/" in message and "after 2 attempt(s)" in message
    assert TEST_SECRET_KEY not in message and TEST_ACCESS_KEY not in message
    assert len(store.sleeps) == 1
    assert s3_bucket.object_keys() == []  # the real bucket of that name got nothing, least of all a marker


def test_credentials_in_the_endpoint_url_never_reach_a_message(tmp_path):
    local = stage_folder(tmp_path / "out", FILES)
    port = free_port()
    location = S3Location("bucket", "castlora", f"http://castlora-user:hunter2-secret@127.0.0.1:{port}", "us-east-1")
    factory = boto3_client_factory(location, TEST_ACCESS_KEY, TEST_SECRET_KEY, botocore_attempts=1)
    store = S3Store(location, factory, RetryPolicy(2, 0.001, 0.01), (TEST_SECRET_KEY,), sleep=lambda _: None)

    with pytest.raises(StorageError) as raised:
        store.publish_tree(local, "pairs/a__b/references")

    message = str(raised.value)
    assert f"at http://127.0.0.1:{port} failed" in message
    assert "hunter2-secret" not in message and "castlora-user" not in message
    assert location.endpoint == f"http://127.0.0.1:{port}"


def test_fetch_refuses_a_marker_that_names_a_path_outside_the_folder(s3_bucket, tmp_path):
    marker = {"format": 1, "files": [{"name": "../../escape.txt", "size": 1, "sha256": "0" * 64}]}
    s3_bucket.client.put_object(
        Bucket=s3_bucket.name, Key=f"castlora/pairs/a__b/references/{MARKER_NAME}", Body=json.dumps(marker).encode()
    )
    with pytest.raises(StorageError, match="corrupt"):
        make_store(s3_bucket).fetch_tree("pairs/a__b/references", tmp_path / "in")
    assert not (tmp_path / "escape.txt").exists()


def test_listing_children_and_files(s3_bucket, tmp_path):
    store = make_store(s3_bucket)
    for key in ["inbox/a__b/pair.yaml", "inbox/a__b/a/0.jpg", "inbox/c__d/c/0.jpg", "inbox/top.txt"]:
        store.put_bytes(b"x", key)
    assert store.list_children("inbox") == ["a__b", "c__d"]
    assert sorted(f.name for f in store.list_files("inbox/a__b")) == ["a/0.jpg", "pair.yaml"]
    assert store.list_children("nothing-here") == []
