"""The inbox under hostile or careless input: confinement of every file at every read, one bad folder never
stopping the others, and a spec that means what the user meant. Every hostile file is built in a temp dir."""

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from pipeline.errors import CastloraError, ConfinementError, SpecError
from pipeline.prior_images import list_class_image_files
from pipeline.segment.user_masks import find_user_mask
from pipeline.spec import MAX_ERROR_CHARS, load_spec
from pipeline.stages.captions import _user_caption, user_caption_files
from pipeline.storage.paths import DataLayout
from pipeline.storage.registry import load_registered, register_pair, scan_inbox, spec_fingerprint

SECRET = "AWS_SECRET_ACCESS_KEY=hunter2-very-secret"


@pytest.fixture
def inbox(tmp_path, make_pair):
    """A data home whose inbox holds the good pair ``a__b``, and a secret file outside it."""
    layout = DataLayout.at(tmp_path / "home")
    layout.inbox.mkdir(parents=True)
    shutil.move(make_pair("a__b"), layout.inbox / "a__b")
    secret = tmp_path / "environ"
    secret.write_text(f"{SECRET} a dog tok0 dog\n")
    return layout, secret


def _add(folder: Path, text: str) -> None:
    (folder / "pair.yaml").write_text((folder / "pair.yaml").read_text() + text)


def _character_field(folder: Path, index: int, line: str) -> None:
    """Add ``line`` (e.g. 'masks: m') to character ``index`` of the make_pair spec."""
    text = (folder / "pair.yaml").read_text()
    token = f"token_phrase: tok{index} dog\n"
    (folder / "pair.yaml").write_text(text.replace(token, token + f"    {line}\n"))


# --- Confinement holds for every file, at every read ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["masks", "captions", "class_images"])
def test_a_symlinked_file_in_a_masks_captions_or_class_images_folder_is_refused(inbox, kind):
    layout, secret = inbox
    folder = layout.inbox / "a__b"
    (folder / "extra").mkdir()
    (folder / "extra" / "00.txt" if kind == "captions" else folder / "extra" / "00.png").symlink_to(secret)
    if kind == "class_images":
        _add(folder, "class_images:\n  dog: extra\n")
    else:
        _character_field(folder, 0, f"{kind}: extra")
    [entry] = scan_inbox(layout)
    assert entry.spec is None
    assert "points outside the pair folder" in entry.error and "00." in entry.error
    assert "hunter2" not in entry.error
    # Registered by hand (the user's own files), the same spec may link anywhere.
    assert load_spec(folder).pair == "a__b"


@pytest.mark.parametrize("what", ["spec", "folder"])
def test_a_symlinked_pair_yaml_or_inbox_folder_is_refused(inbox, tmp_path, make_pair, what):
    layout, _ = inbox
    if what == "spec":
        folder = layout.inbox / "a__b"
        (folder / "real.yaml").write_text((folder / "pair.yaml").read_text())
        (folder / "pair.yaml").unlink()
        (folder / "pair.yaml").symlink_to(folder / "real.yaml")
        expected = "spec file is a symlink"
    else:
        shutil.rmtree(layout.inbox / "a__b")
        (layout.inbox / "c__d").symlink_to(make_pair("c__d"), target_is_directory=True)
        expected = "pair folder is a symlink"
    [entry] = scan_inbox(layout)
    assert entry.spec is None and expected in entry.error


def test_user_caption_errors_never_quote_the_file(tmp_path):
    caption = tmp_path / "00.txt"
    caption.write_text(f"{SECRET} and more words\n")
    with pytest.raises(CastloraError, match="does not contain the token phrase 'tok0 dog'") as info:
        _user_caption(caption, "tok0 dog")
    assert "hunter2" not in str(info.value) and str(caption) in str(info.value)
    caption.write_bytes(SECRET.encode() + b"\xff\xfe")
    with pytest.raises(CastloraError, match="not UTF-8") as info:
        _user_caption(caption, "tok0 dog")
    assert "hunter2" not in str(info.value)


def test_files_swapped_for_symlinks_after_registration_are_refused_at_read(inbox):
    """Check-then-use: registration checked the files, but a stage re-checks them when it reads them."""
    layout, secret = inbox
    folder = layout.inbox / "a__b"
    for name in ("masks", "captions", "classes"):
        (folder / name).mkdir()
    (folder / "masks" / "00.png").write_bytes(b"mask")
    (folder / "captions" / "00.txt").write_text("tok0 dog on grass")
    (folder / "classes" / "c.png").write_bytes(b"class")
    _character_field(folder, 0, "masks: masks")
    _character_field(folder, 0, "captions: captions")
    _add(folder, "class_images:\n  dog: classes\n")
    [entry] = scan_inbox(layout)
    assert entry.error is None
    register_pair(layout, entry.spec)
    spec = load_registered(layout, "a__b")
    photo = Path(spec.characters[0].photos[0])
    assert find_user_mask(folder / "masks", photo, Path(spec.confined_to)) == folder / "masks" / "00.png"

    for swapped in (folder / "masks" / "00.png", folder / "captions" / "00.txt", folder / "classes" / "c.png"):
        swapped.unlink()
        swapped.symlink_to(secret)
    with pytest.raises(ConfinementError, match="User mask"):
        find_user_mask(folder / "masks", photo, Path(spec.confined_to))
    with pytest.raises(ConfinementError, match="User caption"):
        user_caption_files(spec)
    with pytest.raises(ConfinementError, match="Class image"):
        list_class_image_files(folder / "classes", Path(spec.confined_to))
    # A photo swapped for a symlink is refused as soon as a stage loads the registered spec.
    photo.unlink()
    photo.symlink_to(secret)
    with pytest.raises(ConfinementError, match="points outside the pair folder") as info:
        load_registered(layout, "a__b")
    assert "hunter2" not in str(info.value)


def test_confinement_does_not_change_the_run_key(inbox):
    """Recording the pair folder in the registered spec does not re-run every existing inbox pair."""
    layout, _ = inbox
    confined = load_spec(layout.inbox / "a__b", pair_key="a__b", confine=True)
    assert confined.confined_to == str((layout.inbox / "a__b").resolve())
    assert spec_fingerprint(confined) == spec_fingerprint(load_spec(layout.inbox / "a__b"))


def test_a_relative_file_uri_resolves_against_the_spec_folder(tmp_path, make_pair, monkeypatch):
    folder = make_pair("a__b")
    (folder / "pair.yaml").write_text((folder / "pair.yaml").read_text().replace("photos: a\n", "photos: file:a\n"))
    elsewhere = tmp_path / "cwd"
    (elsewhere / "a").mkdir(parents=True)
    (elsewhere / "a" / "decoy.jpg").write_bytes(b"x")
    monkeypatch.chdir(elsewhere)
    spec = load_spec(folder)
    assert [Path(p).parent for p in spec.characters[0].photos] == [(folder / "a").resolve()] * 3
    _character_field(folder, 1, "masks: file://otherhost/m")
    with pytest.raises(SpecError, match="names a host"):
        load_spec(folder)


# --- One bad folder never stops the others -------------------------------------------------------------------


def _hostile(folder: Path, case: str) -> None:
    """Turn the make_pair folder into one of the hostile cases (the first character's photos, or class_images)."""
    spec = folder / "pair.yaml"

    def first_photos(value: str) -> None:
        spec.write_text(re.sub(r"photos: \w+\n", lambda _: f"photos: {value}\n", spec.read_text(), count=1))

    if case == "class_images_list":
        _add(folder, "class_images: [dog]\n")
    elif case == "symlink_loop":
        (folder / "loop").symlink_to(folder / "loop")
        first_photos("loop")
    elif case == "long_name":
        first_photos("x" * 300)
    elif case == "nul_byte":
        first_photos('"a\\0b"')
    elif case == "long_name_in_class_images":
        _add(folder, f"class_images:\n  dog: {'y' * 300}/z\n")


HOSTILE = ["class_images_list", "symlink_loop", "long_name", "nul_byte", "long_name_in_class_images"]


@pytest.mark.parametrize("case", HOSTILE)
def test_one_hostile_folder_becomes_a_skip_reason_and_the_others_register(inbox, make_pair, case):
    layout, _ = inbox
    bad = layout.inbox / "c__d"
    shutil.move(make_pair("c__d"), bad)
    _hostile(bad, case)
    entries = {e.folder.name: e for e in scan_inbox(layout)}
    assert entries["a__b"].spec is not None
    assert entries["c__d"].spec is None and entries["c__d"].error
    assert "unexpected" not in entries["c__d"].error  # a SpecError naming the field, not a stray exception
    with pytest.raises(SpecError):
        load_spec(bad)


def test_yaml_alias_bombs_are_refused_quickly_with_a_short_error(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    levels = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (folder / "pair.yaml").write_text("\n".join(levels) + "\npair: p\ncharacters: *a8\n")
    started = time.perf_counter()
    with pytest.raises(SpecError, match="aliases") as info:
        load_spec(folder)
    assert time.perf_counter() - started < 1.0
    assert len(str(info.value)) < 1000


def test_errors_are_capped_in_length(tmp_path, make_pair):
    folder = make_pair("a__b")
    spec = folder / "pair.yaml"
    spec.write_text(spec.read_text().replace("photos: a\n", f"photos: {'z' * 100_000}\n"))
    with pytest.raises(SpecError, match="cannot be") as info:
        load_spec(folder)
    assert len(str(info.value)) < 600
    ids = "".join(f"  - {{id: same, class_noun: dog, token_phrase: t{i} dog, photos: a}}\n" for i in range(2000))
    spec.write_text(f"pair: a__b\ncharacters:\n{ids}")
    with pytest.raises(SpecError, match="unique") as info:
        load_spec(folder)
    assert len(str(info.value)) <= MAX_ERROR_CHARS + 100


@pytest.mark.parametrize(
    ("line", "field", "typed"),
    [
        ("pair: 010", "field 'pair'", "010"),
        ("pair: 1_000", "field 'pair'", "1_000"),
        ("pair: yes", "field 'pair'", "yes"),
    ],
)
def test_unquoted_numbers_are_refused_with_a_hint_to_quote_them(tmp_path, make_pair, line, field, typed):
    folder = make_pair("a__b")
    spec = folder / "pair.yaml"
    spec.write_text(spec.read_text().replace("pair: a__b", line))
    with pytest.raises(SpecError, match="put it in quotes") as info:
        load_spec(folder)
    assert field in str(info.value) and repr(typed) in str(info.value)


def test_unquoted_number_ids_are_refused(make_pair):
    folder = make_pair("a__b")
    spec = folder / "pair.yaml"
    spec.write_text(spec.read_text().replace("id: a\n", "id: 007\n"))
    with pytest.raises(SpecError, match=r"characters\[0\]\.id: '007' is read by YAML as a number"):
        load_spec(folder)


# --- The spec means what the user meant ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "class_noun: dog\n    token_phrase: tok0",
            "class_noun: '   '\n    token_phrase: tok0",
            r"\.class_noun: is empty",
        ),
        ("token_phrase: tok0 dog", "token_phrase: '  '", r"\.token_phrase: is empty"),
        ("class_noun: dog\n    token_phrase: tok0", "class_noun: [dog, cat]\n    token_phrase: tok0", "got a list"),
        ("token_phrase: tok1 dog", "token_phrase: ' TOK0   Dog'", "token phrases must differ"),
        ("photos: a\n", "phtoos: a\n    photos: a\n", "unknown field 'phtoos'; did you mean 'photos'"),
        ("pair: a__b\n", "pair: a__b\nclas_images: {}\n", "unknown field 'clas_images'; did you mean 'class_images'"),
    ],
)
def test_careless_specs_get_a_clear_error_naming_the_field(make_pair, old, new, message):
    folder = make_pair("a__b")
    spec = folder / "pair.yaml"
    assert old in spec.read_text()
    spec.write_text(spec.read_text().replace(old, new, 1))
    with pytest.raises(SpecError, match=message):
        load_spec(folder)


def test_class_images_for_an_unknown_noun_suggest_the_right_one(make_pair):
    folder = make_pair("a__b")
    (folder / "class_dogs").mkdir()
    _add(folder, "class_images:\n  dgo: class_dogs\n")
    with pytest.raises(SpecError, match=r"class_images\.dgo: no character has the class noun 'dgo' \(did you mean"):
        load_spec(folder)


@pytest.mark.parametrize("link", [False, True])
def test_the_same_photo_given_to_two_characters_is_refused(make_pair, link):
    folder = make_pair("a__b")
    target = folder / "b" / "shared.jpg"
    if link:
        os.symlink(folder / "a" / "01.jpg", target)
    else:
        shutil.copyfile(folder / "a" / "01.jpg", target)
    with pytest.raises(SpecError, match="same photo is given to characters 'a'") as info:
        load_spec(folder)
    message = str(info.value)
    assert "'b'" in message and "01.jpg" in message and "teach one identity to both tokens" in message


def test_a_pair_folder_swapped_for_a_symlink_after_registration_is_refused(inbox, tmp_path):
    layout, _ = inbox
    [entry] = scan_inbox(layout)
    register_pair(layout, entry.spec)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(layout.inbox / "a__b", elsewhere)
    (layout.inbox / "a__b").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConfinementError, match="is now a symlink"):
        load_registered(layout, "a__b")
