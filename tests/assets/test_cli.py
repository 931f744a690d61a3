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
