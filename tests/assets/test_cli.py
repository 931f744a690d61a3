import os
import subprocess
import sys
from pathlib import Path

import pytest

from assets import cli

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "CASTLORA_HOME")}
    return {**env, "CASTLORA_HOME": str(tmp_path / "home")}


def test_register_adds_partition_and_lists_pair(tmp_path, make_pair, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = tmp_path / "home"
    assert cli.main(["--home", str(home), "register", str(make_pair("a__b"))]) == 0
    assert (home / "pairs" / "a__b" / "pair.json").is_file()
    assert (home / "dagster_home" / "dagster.yaml").read_text().startswith("telemetry")
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
def test_demo_command_runs_end_to_end(tmp_path):
    """The README's demo path, as a subprocess with the bundled sample pair."""
    result = subprocess.run(
        [sys.executable, "-m", "assets.cli", "demo"],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Outputs for dog6__dog2" in result.stdout
    bank = tmp_path / "home" / "pairs" / "dog6__dog2" / "segmix_bank" / "manifest.parquet"
    assert bank.is_file()
