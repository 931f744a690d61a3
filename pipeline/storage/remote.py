"""Artifacts on S3 (or any S3-compatible store): publish a local folder, fetch it back, list an inbox prefix.

A published folder is complete only when its marker object ``<folder>/_castlora_done.json`` exists. The marker
lists every file with its size and SHA-256 and is written LAST; publishing first deletes the old marker, so a
folder that is being replaced (or whose upload died half-way) is never taken as done, and ``fetch_tree``
refuses it. Each object is written with one PUT, which S3 makes visible all at once or not at all.

Every key is built by ``s3_key``, which validates each relative part and keeps the key under the prefix. Every
call goes through one bounded retry loop (on top of botocore's own retries); the final failure is a
``StorageError`` naming endpoint, bucket, key and attempts, never the credentials.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import PairKeyError, StorageError
from pipeline.redact import without_credentials
from pipeline.storage.atomic import atomic_path
from pipeline.storage.hashing import sha256_file
from pipeline.storage.paths import safe_child

MARKER_NAME = "_castlora_done.json"
MARKER_FORMAT = 1
_CHUNK = 1 << 20
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "503", "500"}

T = TypeVar("T")


def key_parts(path: str, what: str = "S3 key part") -> list[str]:
    """The '/'-separated segments of a relative path, refusing anything that could leave its parent."""
    if not isinstance(path, str) or not path:
        raise PairKeyError(f"Empty {what}: every part of an S3 key must name something.")
    if "\\" in path or any(ord(ch) < 32 for ch in path):
        raise PairKeyError(f"{what} {path!r} contains a backslash or control character; use '/' only.")
    if path.startswith("/"):
        raise PairKeyError(f"{what} {path!r} is absolute; S3 keys are built from relative parts only.")
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise PairKeyError(f"{what} {path!r} has an empty, '.' or '..' segment; it could escape its prefix.")
    return segments


def s3_key(prefix: str, *parts: str) -> str:
    """``prefix/part/part``: the only way castlora builds an S3 key, so no key can leave ``prefix``."""
    head = key_parts(prefix.strip("/"), "S3 prefix") if prefix.strip("/") else []
    if not parts:
        raise PairKeyError("An S3 key needs at least one part below the prefix.")
    tail = [segment for part in parts for segment in key_parts(part)]
    return "/".join(head + tail)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = "castlora"
    endpoint_url: str = ""
    """Empty: AWS S3 itself; set it for MinIO, Ceph, R2, moto and other S3-compatible stores."""
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise StorageError(f"S3 bucket {self.bucket!r} is not a bucket name (set s3_bucket, without s3://).")
        if self.prefix.strip("/"):
            key_parts(self.prefix.strip("/"), "S3 prefix")

    @property
    def endpoint(self) -> str:
        """For messages: the endpoint URL without any user:password@ in it."""
        return without_credentials(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region})"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


@dataclass(frozen=True)
class RetryPolicy:
    """Our own bounded retry loop around each call; botocore retries inside each attempt as well."""

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


def boto3_client_factory(
    location: S3Location,
    access_key_id: str = "",
    secret_access_key: str = "",
    botocore_attempts: int = 2,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
) -> Callable[[], Any]:
    """A factory of boto3 S3 clients. Empty credentials use boto3's default chain (env, profile, IAM role)."""

    def build() -> Any:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=location.region or None,
        )
        config = Config(
            retries={"max_attempts": botocore_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # Path-style URLs work with every S3-compatible server (no wildcard DNS needed).
            s3={"addressing_style": "path"} if location.endpoint_url else None,
        )
        return session.client("s3", endpoint_url=location.endpoint_url or None, config=config)

    return build


@dataclass(frozen=True)
class FetchResult:
    downloaded: list[str]
    reused: list[str]


@dataclass(frozen=True)
class RemoteFile:
    name: str
    """Path relative to the listed folder, '/'-separated."""
    size: int
    etag: str


@dataclass
class S3Store:
    """Folders and files under ``location.prefix``; ``rel`` arguments are relative, '/'-separated paths."""

    location: S3Location
    client_factory: Callable[[], Any]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    secrets: tuple[str, ...] = ()
    """Strings that must never appear in an error message (credentials), replaced by '***'."""
    sleep: Callable[[float], None] = time.sleep
    _client: Any = field(default=None, init=False, repr=False)

    # -- keys and errors -------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return s3_key(self.location.prefix, *parts)

    def uri(self, *parts: str) -> str:
        return self.location.uri(self.key(*parts))

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return without_credentials(text)  # botocore quotes the endpoint URL it failed to reach

    def _error(self, action: str, key: str, exc: BaseException, attempts: int, hint: str = "") -> StorageError:
        reason = self._redact(f"{type(exc).__name__}: {exc}")
        message = (
            f"S3 {action} of {self.location.uri(key)} at {self.location.endpoint} failed after {attempts} "
            f"attempt(s): {reason}."
        )
        return StorageError(message + (f" {hint}" if hint else ""))

    def _call(self, action: str, key: str, fn: Callable[[], T], hint: str = "") -> T:
        """Run ``fn`` with bounded retries on transient failures (connection, timeout, 5xx, throttling)."""
        attempts = max(1, self.retry.attempts)
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                if not _retryable(exc) or attempt == attempts:
                    if _is_credentials_error(exc):
                        hint = (
                            "Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the storage resource's "
                            "aws_access_key_id / aws_secret_access_key via dg.EnvVar)."
                        )
                    raise self._error(action, key, exc, attempt, hint) from exc
                self.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- single objects --------------------------------------------------------------------------------

    def upload_file(self, local: Path, rel: str) -> str:
        """Upload one file (a single PUT: readers see the old object or the whole new one); returns its key."""
        key = self.key(rel)
        local = Path(local)

        def put() -> None:
            with open(local, "rb") as body:  # reopened on every attempt, so a retry sends the whole file
                self.client.put_object(Bucket=self.location.bucket, Key=key, Body=body)

        self._call("upload", key, put)
        return key

    def put_bytes(self, data: bytes, rel: str) -> str:
        key = self.key(rel)
        self._call("upload", key, lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data))
        return key

    def get_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        key = self.key(rel)

        def get() -> bytes | None:
            try:
                response = self.client.get_object(Bucket=self.location.bucket, Key=key)
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise
            return response["Body"].read()

        return self._call("download", key, get)

    def exists(self, rel: str) -> bool:
        key = self.key(rel)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.location.bucket, Key=key)
            except Exception as exc:
                if _is_missing(exc):
                    return False
                raise
            return True

        return self._call("lookup", key, head)

    def delete(self, rel: str) -> None:
        key = self.key(rel)
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def download_file(self, rel: str, target: Path, size: int | None = None, sha256: str | None = None) -> Path:
        """Download to ``target`` atomically; with ``size``/``sha256`` the bytes are verified before the rename."""
        key = self.key(rel)

        def get() -> None:
            response = self.client.get_object(Bucket=self.location.bucket, Key=key)
            digest, written = hashlib.sha256(), 0
            with atomic_path(target) as temporary:
                with open(temporary, "wb") as handle:
                    for chunk in _chunks(response["Body"]):
                        handle.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                if (size is not None and written != size) or (sha256 is not None and digest.hexdigest() != sha256):
                    raise StorageError(
                        f"{self.location.uri(key)} does not match its completion marker (got {written} bytes, "
                        f"sha256 {digest.hexdigest()[:12]}…); it may be being republished: retry the run."
                    )

        self._call("download", key, get)
        return target

    # -- folders ---------------------------------------------------------------------------------------

    def read_marker(self, rel: str) -> dict[str, Any] | None:
        raw = self.get_bytes(f"{rel}/{MARKER_NAME}")
        return None if raw is None else self._parse_marker(raw, rel)

    def _parse_marker(self, raw: bytes, rel: str) -> dict[str, Any]:
        try:
            marker = json.loads(raw)
            files = marker["files"]
            for entry in files:
                key_parts(entry["name"], "file name in the completion marker")
                int(entry["size"]), str(entry["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(
                f"{self.uri(rel, MARKER_NAME)} is corrupt ({exc}); materialize the asset again to republish it."
            ) from exc
        return marker

    def is_published(self, rel: str) -> bool:
        return self.exists(f"{rel}/{MARKER_NAME}")

    def publish_tree(self, local_dir: Path, rel: str) -> dict[str, Any]:
        """Upload every file under ``local_dir`` to ``rel/``, then the completion marker (last); returns it.

        The old marker is deleted before anything is uploaded, so until this call returns the folder reads as
        not published. Files whose name and hash the old marker already lists are not uploaded again.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"{local_dir} does not exist: there is nothing to publish to {self.uri(rel)}.")
        try:
            return self._publish_tree(local_dir, rel)
        except StorageError as exc:
            raise StorageError(
                f"{exc} {self.uri(rel)} is NOT marked done (the local copy in {local_dir} is kept); materialize "
                "the asset again once the problem above is fixed."
            ) from exc

    def _publish_tree(self, local_dir: Path, rel: str) -> dict[str, Any]:
        entries = [
            {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}
            for name, path in _local_files(local_dir)
        ]
        raw = self.get_bytes(f"{rel}/{MARKER_NAME}")
        try:
            previous = self._parse_marker(raw, rel) if raw is not None else None
        except StorageError:
            previous = None  # a corrupt old marker is simply replaced
        already = {(e["name"], e["sha256"]) for e in (previous or {}).get("files", [])}
        self.delete(f"{rel}/{MARKER_NAME}")
        for entry in entries:
            if (entry["name"], entry["sha256"]) not in already:
                self.upload_file(local_dir / entry["name"], f"{rel}/{entry['name']}")
        marker = {"format": MARKER_FORMAT, "published_at": time.time(), "files": entries}
        self.put_bytes(json.dumps(marker, indent=1).encode(), f"{rel}/{MARKER_NAME}")
        return marker

    def fetch_tree(self, rel: str, local_dir: Path) -> FetchResult:
        """Download a published folder into ``local_dir``; files already identical locally are kept."""
        marker = self.read_marker(rel)
        if marker is None:
            raise StorageError(
                f"{self.uri(rel)} is not published or incomplete (no {MARKER_NAME}): its upload never finished. "
                "Materialize the asset that writes it again."
            )
        local_dir = Path(local_dir)
        downloaded, reused = [], []
        for entry in marker["files"]:
            target = safe_child(local_dir, *key_parts(entry["name"]))
            if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
                reused.append(entry["name"])
                continue
            self.download_file(f"{rel}/{entry['name']}", target, entry["size"], entry["sha256"])
            downloaded.append(entry["name"])
        return FetchResult(downloaded, reused)

    def list_children(self, rel: str) -> list[str]:
        """Names of the immediate sub-folders of ``rel`` (S3 common prefixes)."""
        base = self.key(rel) + "/"
        names = []
        for page in self._pages(base, delimiter="/"):
            names += [p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(n for n in names if n)

    def list_files(self, rel: str) -> list[RemoteFile]:
        """Every object below ``rel``, with its path relative to ``rel``."""
        base = self.key(rel) + "/"
        found = []
        for page in self._pages(base):
            for item in page.get("Contents", []):
                name = item["Key"][len(base) :]
                if name:
                    found.append(RemoteFile(name, int(item["Size"]), str(item.get("ETag", "")).strip('"')))
        return found

    def _pages(self, base: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
        token = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": base}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("listing", base, lambda kwargs=kwargs: self.client.list_objects_v2(**kwargs))
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """Files to publish: everything but temporary files of interrupted atomic writes and the marker itself."""
    found = []
    for path in sorted(local_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(local_dir).as_posix()
        if any(part.startswith(".tmp") for part in relative.split("/")) or relative == MARKER_NAME:
            continue
        found.append((relative, path))
    return found


def _chunks(body: Any) -> Iterator[bytes]:
    while chunk := body.read(_CHUNK):
        yield chunk


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    error = response.get("Error", {}) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status or "")


def _is_missing(exc: BaseException) -> bool:
    return _error_code(exc) in _MISSING_CODES


def _is_credentials_error(exc: BaseException) -> bool:
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    code = _error_code(exc)
    return isinstance(exc, NoCredentialsError | PartialCredentialsError) or code in {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    }


def _retryable(exc: BaseException) -> bool:
    """Transient failures worth another attempt; a 4xx (missing bucket, denied) will not fix itself."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(exc, BotoConnectionError | HTTPClientError | ConnectionError | TimeoutError):
        return True
    code = _error_code(exc)
    status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return code in _RETRYABLE_CODES or int(status) >= 500
