import pytest

from assets import cli


def test_register_adds_partition_and_lists_pair(tmp_path, make_pair, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = tmp_path / "home"
    assert cli.main(["--home", str(home), "register", str(make_pair("a__b"))]) == 0
    assert (home / "pairs" / "a__b" / "pair.json").is_file()
    assert (home / "dagster_home" / "dagster.yaml").read_text().count("telemetry:\n  enabled: false\n") == 1
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster_home")) as instance:
        assert instance.get_dynamic_partitions("character_pairs") == ["a__b"]
    assert cli.main(["--home", str(home), "pairs"]) == 0
    assert capsys.readouterr().out.strip().endswith("a__b")


def test_bad_spec_gives_clear_error_and_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "pair.yaml").write_text("pair: 'bad key'\ncharacters: []\n")
    assert cli.main(["--home", str(tmp_path / "home"), "register", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "castlora:" in err and "pair.yaml" in err and "Invalid pair key" in err


@pytest.mark.parametrize("case", ["class_images: [dog]\n", "loop", "long_name", "nul_byte", "alias"])
def test_hostile_specs_exit_2_with_one_line(tmp_path, make_pair, capsys, monkeypatch, case):
    """A hostile or careless spec is one line on stderr and exit code 2, never a traceback."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    folder = make_pair("a__b")
    spec = folder / "pair.yaml"
    text = spec.read_text()
    if case == "loop":
        (folder / "loop").symlink_to(folder / "loop")
        text = text.replace("photos: a\n", "photos: loop\n")
    elif case == "long_name":
        text = text.replace("photos: a\n", f"photos: {'x' * 300}\n")
    elif case == "nul_byte":
        text = text.replace("photos: a\n", 'photos: "a\\0b"\n')
    elif case == "alias":
        text = text.replace("class_noun: dog", "class_noun: &n dog", 1).replace("class_noun: dog", "class_noun: *n")
    else:
        text += case
    spec.write_text(text)
    assert cli.main(["--home", str(tmp_path / "home"), "register", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("castlora: ") and err.count("\n") == 1 and "Traceback" not in err


def test_materialize_unknown_pair_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert cli.main(["--home", str(tmp_path / "home"), "materialize", "nope__pair"]) == 2
    assert "castlora register" in capsys.readouterr().err
    assert cli.main(["--home", str(tmp_path / "home"), "materialize", "../etc"]) == 2
    assert "Invalid pair key" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_runs_end_to_end(demo_home):
    """The README's demo path, as a subprocess with the bundled sample pair (the shared `demo_home` fixture)."""
    assert "Outputs for dog6__dog2" in demo_home.stdout
    bank = demo_home.data_home / "pairs" / "dog6__dog2" / "segmix_bank" / "manifest.parquet"
    assert bank.is_file()
    assert (demo_home.dagster_home / "dagster.yaml").is_file()
