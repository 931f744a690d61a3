"""The one atomic-write helper: files and folders appear whole or not at all, and a failure leaves the old one."""

from pathlib import Path

import pytest

from pipeline.storage.atomic import atomic_dir, atomic_path


def test_atomic_path_keeps_the_suffix_and_replaces_only_on_success(tmp_path):
    target = tmp_path / "deep" / "image.png"
    with atomic_path(target) as temporary:
        assert temporary.suffix == ".png" and temporary.parent == target.parent and temporary.name.startswith(".tmp-")
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["image.png"]


def test_atomic_dir_replaces_an_existing_folder_whole(tmp_path):
    target = tmp_path / "checkpoint-000010"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with atomic_dir(target) as temporary:
        assert not (temporary / "old.bin").exists()
        (temporary / "new.bin").write_bytes(b"new")
        assert (target / "old.bin").exists()  # readers still see the old folder while the new one is written
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000010"]


def test_atomic_dir_failure_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as temporary:
        (temporary / "config.json").write_text('{"half": true}')
        raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_no_other_module_renames_temporaries_itself():
    """Every atomic write in pipeline/ goes through pipeline.storage.atomic (one scheme, one place to fix)."""
    root = Path(__file__).resolve().parents[3] / "pipeline"
    words = ("os.replace(", "mkstemp(", "mkdtemp(")
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "atomic.py" and any(word in path.read_text() for word in words)
    ]
    assert not offenders, f"write through pipeline.storage.atomic instead: {offenders}"
