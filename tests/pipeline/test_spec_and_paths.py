import json
from pathlib import Path

import pytest

from pipeline.errors import PairKeyError, SpecError
from pipeline.spec import PairSpec, load_spec
from pipeline.storage.paths import DataLayout, safe_child, validate_key
from pipeline.storage.registry import load_registered, register_pair, scan_inbox, spec_fingerprint


@pytest.mark.parametrize("key", ["../x", "a b", "dog6/dog2", "", ".hidden", "UPPER", "a" * 129, "x\n", "é"])
def test_unsafe_pair_keys_are_rejected(key):
    with pytest.raises(PairKeyError, match="Invalid pair key"):
        validate_key(key)


@pytest.mark.parametrize("key", ["dog6__dog2", "a", "pair-1_2"])
def test_safe_pair_keys_pass(key):
    assert validate_key(key) == key


def test_layout_never_escapes_home(tmp_path):
    layout = DataLayout.at(tmp_path)
    assert layout.pair_dir("dog6__dog2") == tmp_path.resolve() / "pairs" / "dog6__dog2"
    with pytest.raises(PairKeyError):
        layout.pair_dir("../../etc")
    with pytest.raises(PairKeyError, match="escapes"):
        safe_child(tmp_path, "a", "..", "..", "b")


def test_home_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CASTLORA_HOME", str(tmp_path / "h"))
    assert DataLayout.at().home == (tmp_path / "h").resolve()


def test_load_spec_resolves_paths_and_round_trips(make_pair):
    folder = make_pair("cat1__cat2")
    spec = load_spec(folder)
    assert spec.pair == "cat1__cat2"
    assert [c.id for c in spec.characters] == ["cat1", "cat2"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for c in spec.characters for p in c.photos)
    assert PairSpec.from_json(spec.to_json()) == spec


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pair.yaml").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pair: ok\ncharacters: []\n", "at least two characters"),
        ("pair: '../x'\ncharacters: []\n", "field 'pair'"),
        (
            "pair: ok\ncharacters:\n  - {id: a, class_noun: dog, token_phrase: t dog}\n"
            "  - {id: b, class_noun: dog, token_phrase: u dog}\n",
            r"characters\[0\]: field 'photos' is missing",
        ),
        ("pair: [unclosed\n", "not valid YAML"),
        ("just a string", "top level must be a mapping"),
    ],
)
def test_malformed_specs_name_the_field(tmp_path, text, message):
    folder = _write(tmp_path / "p", text)
    with pytest.raises(SpecError, match=message) as info:
        load_spec(folder)
    assert "pair.yaml" in str(info.value) or "pair spec" in str(info.value)


def test_missing_photo_folder_is_named(tmp_path):
    folder = _write(
        tmp_path / "p",
        "pair: p\ncharacters:\n"
        "  - {id: a, class_noun: dog, token_phrase: ta dog, photos: nowhere}\n"
        "  - {id: b, class_noun: dog, token_phrase: tb dog, photos: nowhere2}\n",
    )
    with pytest.raises(SpecError, match=r"characters\[0\]\.photos: .*nowhere does not exist"):
        load_spec(folder)


def test_duplicate_ids_and_phrases_rejected(make_pair):
    folder = make_pair("a__b")
    text = (folder / "pair.yaml").read_text().replace("id: b", "id: a")
    (folder / "pair.yaml").write_text(text)
    with pytest.raises(SpecError, match="unique"):
        load_spec(folder)


def test_register_and_load(tmp_path, make_pair):
    layout = DataLayout.at(tmp_path / "home")
    spec = load_spec(make_pair("a__b"))
    path = register_pair(layout, spec)
    assert load_registered(layout, "a__b") == spec
    written_at = path.stat().st_mtime_ns
    register_pair(layout, spec)
    assert path.stat().st_mtime_ns == written_at  # unchanged spec: not rewritten
    with pytest.raises(PairKeyError, match="not registered"):
        load_registered(layout, "c__d")


def test_registered_inbox_spec_follows_a_moved_home(tmp_path, make_pair):
    """Photos inside the data home (inbox folders) are stored relative to pair.json, so a moved home still finds
    them; photos outside it (a registered external folder) stay absolute."""
    layout = DataLayout.at(tmp_path / "home")
    layout.inbox.mkdir(parents=True)
    folder = make_pair("a__b").rename(layout.inbox / "a__b")
    external = load_spec(make_pair("c__d"))
    register_pair(layout, load_spec(folder))
    register_pair(layout, external)
    stored = json.loads(layout.spec_path("a__b").read_text())
    assert stored["characters"][0]["photos"][0] == "../../inbox/a__b/a/00.jpg"
    assert json.loads(layout.spec_path("c__d").read_text())["characters"][0]["photos"] == list(
        external.characters[0].photos
    )
    moved = DataLayout.at(tmp_path / "elsewhere")
    layout.home.rename(moved.home)
    spec = load_registered(moved, "a__b")
    photos = [Path(p) for c in spec.characters for p in c.photos]
    assert len(photos) == 6 and all(p.is_file() and p.is_relative_to(moved.home) for p in photos)
    assert load_registered(moved, "c__d") == external
    assert spec.source == str(moved.inbox / "a__b" / "pair.yaml")


def test_scan_inbox_reports_bad_folders_and_keeps_good_ones(tmp_path, make_pair):
    layout = DataLayout.at(tmp_path / "home")
    good = make_pair("a__b")
    layout.inbox.mkdir(parents=True)
    good.rename(layout.inbox / "a__b")
    _write(layout.inbox / "broken", "pair: broken\ncharacters: 3\n")
    _write(layout.inbox / "Bad Name", "pair: x\n")
    (layout.inbox / "no_spec_yet").mkdir()
    entries = {e.folder.name: e for e in scan_inbox(layout)}
    assert set(entries) == {"a__b", "broken", "Bad Name"}
    assert entries["a__b"].spec is not None and entries["a__b"].error is None
    assert "at least two characters" in entries["broken"].error
    assert "Invalid inbox folder name" in entries["Bad Name"].error


def test_fingerprint_changes_with_photos(make_pair):
    folder = make_pair("a__b")
    before = spec_fingerprint(load_spec(folder))
    (folder / "a" / "00.jpg").rename(folder / "a" / "renamed.jpg")
    assert spec_fingerprint(load_spec(folder)) != before


@pytest.mark.parametrize("escape", ["../outside", "{outside}", "file://{outside}", "link_out"])
def test_inbox_specs_cannot_name_files_outside_their_folder(tmp_path, make_pair, escape):
    """An inbox folder may come from anyone who can write to the inbox: its paths stay inside it."""
    layout = DataLayout.at(tmp_path / "home")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"not yours")
    folder = make_pair("a__b")
    layout.inbox.mkdir(parents=True)
    inbox_folder = layout.inbox / "a__b"
    folder.rename(inbox_folder)
    (inbox_folder / "link_out").symlink_to(outside, target_is_directory=True)
    if escape == "../outside":
        # relative to the inbox folder: <inbox>/a__b/../../../outside
        escape = str(Path("..") / ".." / ".." / "outside")
    spec_text = (
        (inbox_folder / "pair.yaml").read_text().replace("photos: a\n", f"photos: {escape.format(outside=outside)}\n")
    )
    (inbox_folder / "pair.yaml").write_text(spec_text)
    [entry] = scan_inbox(layout)
    assert entry.spec is None
    assert "points outside the pair folder" in entry.error and "characters[0].photos" in entry.error
    # The same spec registered by hand (a user's own files) may point anywhere.
    assert load_spec(inbox_folder).characters[0].photos == (str(outside / "secret.jpg"),)


def test_inbox_spec_with_a_symlinked_photo_pointing_outside_is_refused(tmp_path, make_pair):
    layout = DataLayout.at(tmp_path / "home")
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"x")
    layout.inbox.mkdir(parents=True)
    inbox_folder = layout.inbox / "a__b"
    make_pair("a__b").rename(inbox_folder)
    (inbox_folder / "a" / "99.jpg").symlink_to(outside)
    [entry] = scan_inbox(layout)
    assert entry.spec is None and "points outside" in entry.error


def _with_relative_size(folder: Path, value: str) -> None:
    spec = folder / "pair.yaml"
    spec.write_text(spec.read_text().replace("photos: alpha\n", f"photos: alpha\n    relative_size: {value}\n", 1))


def test_relative_size_is_parsed_and_the_others_count_as_one(make_pair):
    folder = make_pair()
    plain = load_spec(folder)
    assert plain.relative_sizes is None and '"relative_size":' not in plain.to_json()  # old fingerprints kept
    _with_relative_size(folder, '"2"')
    spec = load_spec(folder)
    assert spec.character("alpha").relative_size == 2.0 and spec.character("beta").relative_size is None
    assert spec.relative_sizes == {"alpha": 2.0, "beta": 1.0}
    assert PairSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2", r"characters\[0\]\.relative_size: '2' is read by YAML as a number, not text.*put it in quotes"),
        ('"0"', r"characters\[0\]\.relative_size: '0' must be a finite number > 0"),
        ('"-1.5"', r"characters\[0\]\.relative_size: '-1.5' must be a finite number > 0"),
        ('"inf"', r"characters\[0\]\.relative_size: 'inf' must be a finite number > 0"),
        ('"big"', r"characters\[0\]\.relative_size: 'big' is not a number"),
    ],
)
def test_bad_relative_sizes_name_the_field(make_pair, value, message):
    folder = make_pair()
    _with_relative_size(folder, value)
    with pytest.raises(SpecError, match=message):
        load_spec(folder)
