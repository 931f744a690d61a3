"""One way to declare a stage asset (``stage_asset``) and to run its stage (``StorageResource.stage_run``): lineage
written and the stage published on success; on failure neither, and what the stage wrote stays for a rerun."""

import json

import dagster as dg
import pytest

from assets.compute import CPU_POD_RESOURCES, GPU_POD_RESOURCES, GPU_POOL, K8S_CONFIG_TAG
from assets.jobs import PAIR_ASSETS
from assets.partitions import character_pairs
from assets.stage_asset import GROUP, stage_asset
from pipeline.errors import CastloraError
from pipeline.spec import load_spec
from pipeline.stage_names import Stage
from pipeline.storage.hashing import sha256_file
from pipeline.storage.lineage import read_lineage
from pipeline.storage.remote import MARKER_NAME
from resources import StorageResource
from tests.resources.test_storage_s3 import s3_storage

PAIR = "a__b"


class DrillConfig(dg.Config):
    fail: bool = False


@stage_asset(Stage.CAPTIONS, gpu=False, kinds={"python"}, code_version="drill-v1", description="A drill stage.")
def drill(context: dg.AssetExecutionContext, config: DrillConfig, storage: StorageResource) -> dg.MaterializeResult:
    with storage.stage_run(context, Stage.CAPTIONS) as run:
        path = run.out_dir / "written.txt"
        path.write_text(f"{run.pair}: {', '.join(c.id for c in run.spec.characters)}")
        run.recorder.record(path, sha256_file(path))
        if config.fail:
            raise CastloraError("the stage failed after writing a file")
    return dg.MaterializeResult(metadata={"pair": run.pair})


def materialize(storage: StorageResource, fail: bool) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, [PAIR])
        return dg.materialize(
            [drill],
            instance=instance,
            partition_key=PAIR,
            run_config={"ops": {"captions": {"config": {"fail": fail}}}},
            resources={"storage": storage},
            raise_on_error=False,
        )


@pytest.fixture
def registered(make_pair):
    def register(storage: StorageResource) -> StorageResource:
        storage.register(load_spec(make_pair(PAIR)))
        return storage

    return register


def test_every_stage_asset_is_declared_the_same_way():
    specs = {spec.key.to_user_string(): spec for asset in PAIR_ASSETS for spec in asset.specs}
    assert set(specs) == {stage.value for stage in Stage}
    gpu = {Stage.CHARACTER_IMAGES, Stage.SEGMENTS, Stage.CLASS_IMAGES, Stage.LORA, Stage.SAMPLES, Stage.ITERATION}
    gpu.add(Stage.EVALUATION)
    for asset in PAIR_ASSETS:
        (name,) = [key.to_user_string() for key in asset.keys]
        assert asset.partitions_def == character_pairs and asset.group_names_by_key[asset.key] == GROUP
        assert (asset.op.pool == GPU_POOL) == (name in gpu), name
        pod = json.loads(asset.op.tags[K8S_CONFIG_TAG])  # Dagster keeps a dict tag as JSON
        assert pod == (GPU_POD_RESOURCES if name in gpu else CPU_POD_RESOURCES), name
        assert asset.code_versions_by_key[asset.key]
    assert drill.key == dg.AssetKey(Stage.CAPTIONS.value) and drill.op.pool is None


def test_success_writes_lineage_and_failure_keeps_the_files_but_writes_no_lineage(tmp_path, registered):
    storage = registered(StorageResource(home=str(tmp_path / "home")))
    written = storage.layout.stage_dir(PAIR, Stage.CAPTIONS) / "written.txt"

    failed = materialize(storage, fail=True)
    assert not failed.success and not failed.get_asset_materialization_events()
    assert written.read_text() == "a__b: a, b"  # kept: a rerun resumes from what the stage wrote
    assert not list(storage.layout.lineage.rglob("*.parquet"))

    done = materialize(storage, fail=False)
    assert done.success
    (event,) = done.get_asset_materialization_events()
    assert event.materialization.metadata["pair"].value == PAIR
    lineage = read_lineage(storage.layout.lineage).to_pylist()
    assert [row["artifact_sha256"] for row in lineage] == [sha256_file(written)]
    assert lineage[0]["asset_key"] == "captions" and lineage[0]["code_version"].endswith("/drill-v1")


def test_only_a_successful_stage_is_published(s3_bucket, tmp_path, registered):
    storage = registered(s3_storage(s3_bucket, tmp_path / "home"))
    marker = f"castlora/pairs/{PAIR}/captions/{MARKER_NAME}"

    assert not materialize(storage, fail=True).success
    assert marker not in s3_bucket.object_keys()
    assert not [key for key in s3_bucket.object_keys() if key.startswith("castlora/lineage/")]

    assert materialize(storage, fail=False).success
    keys = s3_bucket.object_keys()
    assert marker in keys and f"castlora/pairs/{PAIR}/captions/written.txt" in keys
    assert [key for key in keys if key.startswith("castlora/lineage/captions/")]
