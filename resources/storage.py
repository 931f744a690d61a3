"""Where artifacts, manifests and lineage live: the local data home, optionally published to S3.

Without ``s3_bucket`` everything stays on local disk. With it, the local data home is the working copy: an
asset reads its upstream stages through ``input_dir`` (fetched from S3 when they are not complete locally),
writes into ``output_dir`` and calls ``publish`` at the end, which uploads the stage folder (completion
marker last) and this run's lineage Parquet files. The inbox can be an S3 prefix too (``sync_inbox``).

Credentials: leave ``aws_access_key_id`` / ``aws_secret_access_key`` empty for boto3's default chain (env
variables, profile, IAM role), or set them with ``dg.EnvVar("AWS_ACCESS_KEY_ID")`` /
``dg.EnvVar("AWS_SECRET_ACCESS_KEY")`` so the values never enter run config, logs or metadata.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import ConfigDict, PrivateAttr

import pipeline
from pipeline.errors import PairKeyError, StorageError
from pipeline.spec import SPEC_FILENAMES, PairSpec
from pipeline.storage.atomic import atomic_path
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.paths import DataLayout, check_home, safe_child, validate_key
from pipeline.storage.registry import load_registered, register_pair
from pipeline.storage.remote import RetryPolicy, S3Location, S3Store, boto3_client_factory, key_parts


def pair_key(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> str:
    """The run's character-pair key, refused (with the rule) if it could not be a safe folder name."""
    if not context.has_partition_key:
        raise dg.Failure("castlora assets and checks run per character pair: select a partition.")
    return validate_key(context.partition_key)


class StageRun:
    """One asset writing its stage for one pair (``StorageResource.stage_run``)."""

    def __init__(self, storage: StorageResource, context: dg.AssetExecutionContext, stage: str) -> None:
        self.pair = pair_key(context)
        self.stage = stage
        self.recorder = storage.recorder(context)
        self._storage = storage

    @functools.cached_property
    def spec(self) -> PairSpec:
        """The pair's registered spec (read once, when first needed)."""
        return self._storage.spec(self.pair)

    @functools.cached_property
    def out_dir(self) -> Path:
        """The stage's folder (``StorageResource.output_dir``), made when the stage first needs it."""
        return self._storage.output_dir(self.pair, self.stage)


class StorageResource(dg.ConfigurableResource):
    """The data home. Empty ``home`` means ``$CASTLORA_HOME``, else ``./castlora_data``."""

    # The docstrings under the fields are the launchpad's field descriptions.
    model_config = ConfigDict(use_attribute_docstrings=True)

    home: str = ""
    """The data home folder; empty: ``$CASTLORA_HOME``, else ``./castlora_data``."""
    s3_bucket: str = ""
    """Empty: local disk only. Otherwise stages, registered specs and lineage are published to this bucket."""
    s3_prefix: str = "castlora"
    """Every key lives under this prefix: <prefix>/pairs/<pair>/<stage>/..., <prefix>/lineage/..., <prefix>/inbox/."""
    s3_endpoint_url: str = ""
    """Empty: AWS S3. Set for S3-compatible stores (MinIO, Ceph, R2), e.g. http://minio:9000."""
    s3_region: str = "us-east-1"
    """Region of the bucket."""
    aws_access_key_id: str = ""
    """Use dg.EnvVar("AWS_ACCESS_KEY_ID"); empty: boto3's default credential chain."""
    aws_secret_access_key: str = ""
    """Use dg.EnvVar("AWS_SECRET_ACCESS_KEY"); empty: boto3's default credential chain."""
    s3_attempts: int = 4
    """Attempts per S3 call in castlora's own retry loop (each attempt also retries inside botocore)."""
    s3_backoff_s: float = 0.5
    """First wait between attempts; doubles each time, at most 8 s."""
    s3_botocore_attempts: int = 2
    """Attempts botocore makes inside each of castlora's attempts."""
    s3_connect_timeout_s: float = 5.0
    """Seconds to wait for a connection to the S3 endpoint."""

    _store: S3Store | None = PrivateAttr(default=None)

    @property
    def layout(self) -> DataLayout:
        layout = DataLayout.at(self.home or None)
        check_home(layout.home)
        return layout

    @property
    def remote(self) -> S3Store | None:
        """The S3 side, or None when storage is local only."""
        if not self.s3_bucket:
            return None
        if self._store is None:
            location = S3Location(self.s3_bucket, self.s3_prefix, self.s3_endpoint_url, self.s3_region)
            factory = boto3_client_factory(
                location,
                self.aws_access_key_id,
                self.aws_secret_access_key,
                botocore_attempts=self.s3_botocore_attempts,
                connect_timeout_s=self.s3_connect_timeout_s,
            )
            retry = RetryPolicy(attempts=self.s3_attempts, backoff_s=self.s3_backoff_s)
            secrets = (self.aws_access_key_id, self.aws_secret_access_key)
            self._store = S3Store(location, factory, retry, secrets)
        return self._store

    @staticmethod
    def _stage_rel(pair_key: str, stage: str) -> str:
        return f"pairs/{validate_key(pair_key)}/{validate_key(stage, 'stage name')}"

    def input_dir(self, pair_key: str, stage: str) -> Path:
        """An upstream stage's local folder; with S3, its published version is fetched first when missing or
        different locally. A stage never published stays as it is locally (reading its manifest then says
        which asset to materialize)."""
        local = self.layout.stage_dir(pair_key, stage)
        remote = self.remote
        rel = self._stage_rel(pair_key, stage)
        if remote is not None and remote.is_published(rel):
            remote.fetch_tree(rel, local)
        return local

    def input_pair_dir(self, pair_key: str, *stages: str) -> Path:
        """The pair's local folder, for readers of several stages at once (training data): ``input_dir`` of
        each of ``stages`` first."""
        for stage in stages:
            self.input_dir(pair_key, stage)
        return self.layout.pair_dir(pair_key)

    def output_dir(self, pair_key: str, stage: str) -> Path:
        """The folder an asset writes its stage into (created). With S3 it starts from the last published
        version, so resumable stages (LoRA checkpoints, iteration rounds) continue on a fresh machine."""
        return self.layout.ensure(self.input_dir(pair_key, stage))

    def publish(self, context_or_run_id: dg.AssetExecutionContext | str, pair_key: str, *stages: str) -> list[str]:
        """Upload this run's lineage files for the pair, then each stage folder (its marker last); returns the
        S3 URIs of the stages. A no-op on local-only storage."""
        remote = self.remote
        if remote is None:
            return []
        if isinstance(context_or_run_id, str):
            run_id, asset_folder = context_or_run_id, "*"
        else:  # only this asset's lineage (LineageRecorder's folder name for it)
            run_id = context_or_run_id.run.run_id
            asset_folder = context_or_run_id.asset_key.to_user_string().replace("/", "__")
        lineage = self.layout.lineage
        pattern = f"{asset_folder}/{validate_key(pair_key)}__*.parquet"
        runs_lineage = [p for p in sorted(lineage.glob(pattern)) if run_id in p.stem]
        try:
            for path in runs_lineage:
                remote.upload_file(path, "lineage/" + path.relative_to(lineage).as_posix())
        except StorageError as exc:
            stages_uris = ", ".join(remote.uri(self._stage_rel(pair_key, stage)) for stage in stages)
            raise StorageError(
                f"{exc} Lineage is uploaded first, so {stages_uris} is NOT marked done (the local copy is kept); "
                "materialize the asset again once the problem above is fixed."
            ) from exc
        uris = []
        for stage in stages:
            rel = self._stage_rel(pair_key, stage)
            remote.publish_tree(self.layout.stage_dir(pair_key, stage), rel)
            uris.append(remote.uri(rel))
        return uris

    @contextlib.contextmanager
    def stage_run(self, context: dg.AssetExecutionContext, stage: str) -> Iterator[StageRun]:
        """The pair, spec, output folder and lineage recorder of the asset writing ``stage``. When the block
        succeeds, the lineage is written and the stage published; when it fails, neither happens (what the
        stage wrote stays on local disk, so a rerun resumes from it)."""
        run = StageRun(self, context, stage)
        yield run
        run.recorder.flush()
        self.publish(context, run.pair, stage)

    def register(self, spec: PairSpec) -> Path:
        """Register a pair locally and, with S3, publish its spec so every machine can read it."""
        path = register_pair(self.layout, spec)
        remote = self.remote
        if remote is not None:
            rel = f"pairs/{validate_key(spec.pair)}/pair.json"
            data = path.read_bytes()
            if remote.get_bytes(rel) != data:
                remote.put_bytes(data, rel)
        return path

    def spec(self, pair_key: str) -> PairSpec:
        """The registered spec; with S3, fetched from ``pairs/<pair>/pair.json`` when this machine lacks it, and
        the pair's S3 inbox folder (photos, masks the spec points at) mirrored locally first."""
        path = self.layout.spec_path(pair_key)
        remote = self.remote
        if remote is not None:
            self._sync_inbox_folder(remote, validate_key(pair_key))
        if remote is not None and not path.is_file():
            data = remote.get_bytes(f"pairs/{validate_key(pair_key)}/pair.json")
            if data is not None:
                with atomic_path(path) as temporary:
                    temporary.write_bytes(data)
        return load_registered(self.layout, pair_key)

    def sync_inbox(self) -> list[str]:
        """Mirror S3 ``inbox/<pair>/...`` folders that hold a spec file into the local inbox, so ``scan_inbox``
        sees them; returns the problems found (unsafe names), one message per skipped folder or file."""
        remote = self.remote
        if remote is None:
            return []
        problems: list[str] = []
        for name in remote.list_children("inbox"):
            try:
                validate_key(name, "inbox folder name (used as the pair key)")
            except PairKeyError as exc:
                problems.append(f"{remote.uri('inbox')}/{name}: {exc}")
                continue
            problems += self._sync_inbox_folder(remote, name)
        return problems

    def _sync_inbox_folder(self, remote: S3Store, name: str) -> list[str]:
        """Mirror S3 ``inbox/<name>/`` into the local inbox when it holds a spec file; returns problems."""
        folder = safe_child(self.layout.inbox, validate_key(name, "inbox folder name (used as the pair key)"))
        files = remote.list_files(f"inbox/{name}")
        if not any(f.name in SPEC_FILENAMES for f in files):
            return []  # not a pair folder (yet): its spec file is what makes it one
        problems = []
        for remote_file in files:
            try:
                target = safe_child(folder, *key_parts(remote_file.name, "inbox file name"))
            except PairKeyError as exc:
                problems.append(f"{remote.uri('inbox', name)}: {exc}")
                continue
            if not _same_file(target, remote_file.size, remote_file.etag):
                remote.download_file(f"inbox/{name}/{remote_file.name}", target, size=remote_file.size)
        return problems

    def recorder(self, context: dg.AssetExecutionContext) -> LineageRecorder:
        """Lineage for the running asset; its code version is the one declared on the asset."""
        code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or "unversioned"
        return LineageRecorder(
            root=self.layout.lineage,
            run_id=context.run.run_id,
            asset_key=context.asset_key.to_user_string(),
            partition_key=context.partition_key,
            code_version=f"castlora-{pipeline.__version__}/{code_version}",
            home=self.layout.home,
        )


def _same_file(path: Path, size: int, etag: str) -> bool:
    """Whether a local file already holds an object: same size and, for single-part uploads (ETag = MD5),
    the same MD5."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    if "-" in etag or len(etag) != 32:
        return True  # multipart ETags are not an MD5 of the content; size is all there is to compare
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == etag
