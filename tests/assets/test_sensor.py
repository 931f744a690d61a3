import shutil

import dagster as dg

from assets.partitions import character_pairs
from assets.sensors import inbox_sensor
from pipeline.storage.paths import DataLayout
from pipeline.storage.registry import load_registered, registered_pairs
from resources import StorageResource


def _evaluate(instance, home):
    context = dg.build_sensor_context(instance=instance, resources={"storage": StorageResource(home=str(home))})
    return inbox_sensor(context)


def test_sensor_registers_new_pairs_and_survives_a_bad_one(tmp_path, make_pair):
    home = tmp_path / "home"
    layout = DataLayout.at(home)
    layout.inbox.mkdir(parents=True)
    shutil.move(make_pair("a__b"), layout.inbox / "a__b")
    bad = layout.inbox / "c__d"
    bad.mkdir()
    (bad / "pair.yaml").write_text("pair: c__d\ncharacters: not-a-list\n")

    with dg.instance_for_test() as instance:
        result = _evaluate(instance, home)
        assert [r.partition_key for r in result.run_requests] == ["a__b"]
        (request,) = result.dynamic_partitions_requests
        assert request.partitions_def_name == character_pairs.name
        assert list(request.partition_keys) == ["a__b"]
        assert load_registered(layout, "a__b").pair == "a__b"

        # Once the partition exists, the sensor does not add it again, and the run key stays stable.
        instance.add_dynamic_partitions(character_pairs.name, ["a__b"])
        again = _evaluate(instance, home)
        assert again.dynamic_partitions_requests == []
        assert again.run_requests[0].run_key == result.run_requests[0].run_key

        # Editing the photo set changes the run key, so the pair is materialized again.
        (layout.inbox / "a__b" / "a" / "00.jpg").unlink()
        edited = _evaluate(instance, home)
        assert edited.run_requests[0].run_key != result.run_requests[0].run_key


def test_sensor_skips_with_reason_when_only_bad_folders(tmp_path):
    home = tmp_path / "home"
    bad = DataLayout.at(home).inbox / "x__y"
    bad.mkdir(parents=True)
    (bad / "pair.json").write_text("{not json")
    with dg.instance_for_test() as instance:
        result = _evaluate(instance, home)
    assert result.run_requests == []
    assert "x__y" in result.skip_reason.skip_message


def test_hostile_inbox_folders_are_skip_reasons_and_the_good_pair_still_runs(tmp_path, make_pair):
    """A list where a mapping belongs, a symlink loop, a 300-character name, a NUL byte: each one is a skip
    reason for its own folder, and the sensor tick goes on to register the good pair."""
    home = tmp_path / "home"
    layout = DataLayout.at(home)
    layout.inbox.mkdir(parents=True)
    shutil.move(make_pair("a__b"), layout.inbox / "a__b")
    hostile = {
        "c__d": "class_images: [dog]\n",
        "e__f": "  - {id: x, class_noun: dog, token_phrase: x dog, photos: loop}\n",
        "g__h": f"  - {{id: x, class_noun: dog, token_phrase: x dog, photos: {'x' * 300}}}\n",
        "i__j": '  - {id: x, class_noun: dog, token_phrase: x dog, photos: "a\\0b"}\n',
    }
    for key, extra in hostile.items():
        folder = layout.inbox / key
        shutil.move(make_pair(key), folder)
        (folder / "loop").symlink_to(folder / "loop")
        spec = folder / "pair.yaml"
        spec.write_text(spec.read_text() + extra)  # class_images, or a third character with a hostile photo
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"storage": StorageResource(home=str(home))})
        result = inbox_sensor(context)
        assert [r.partition_key for r in result.run_requests] == ["a__b"]
        assert registered_pairs(layout) == ["a__b"]
        # With no good folder left, every hostile folder is named in the skip reason.
        shutil.rmtree(layout.inbox / "a__b")
        skipped = inbox_sensor(context)
    assert skipped.run_requests == []
    assert all(key in skipped.skip_reason.skip_message for key in hostile)
