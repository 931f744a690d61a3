"""A pair imported from MuDI's layout runs through the assets with its own masks and captions."""

import dagster as dg

from assets import pair_assets
from assets.definitions import build_resources
from assets.partitions import character_pairs
from pipeline.mudi_import import import_mudi
from pipeline.spec import load_spec
from pipeline.storage.manifest import read_manifest
from pipeline.storage.paths import DataLayout
from pipeline.storage.registry import register_pair
from tests.pipeline.test_mudi_import import PHRASES, _text, mudi_folder


def test_imported_pair_uses_its_masks_and_captions(tmp_path):
    layout = DataLayout.at(tmp_path / "home")
    spec = load_spec(import_mudi(mudi_folder(tmp_path), tmp_path / "pair"))
    register_pair(layout, spec)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, [spec.pair])
        result = dg.materialize(
            [pair_assets.references, pair_assets.segments, pair_assets.captions],
            instance=instance,
            partition_key=spec.pair,
            resources=build_resources({"CASTLORA_HOME": str(layout.home)}),
        )
    assert result.success
    assert result.asset_materializations_for_node("captions")[0].metadata["user_captions"].value == 6
    captions = read_manifest(layout.stage_dir(spec.pair, "captions"), "captions")
    assert set(captions["caption"]) == {_text(cid, n) for cid in PHRASES for n in range(3)}
    segments = read_manifest(layout.stage_dir(spec.pair, "segments"), "segments")
    assert set(segments["segmenter"]) == {"user mask"} and set(segments["status"]) == {"ok"}
