"""The CLI contract: subcommands, help, one-line errors with exit code 2."""

import subprocess
import sys

import pytest
from ase.io import read

from xtalforge.cli import build_parser, main

COMMANDS = ["generate", "relax", "search", "report", "oracles", "train", "evaluate", "dataset"]


def test_every_command_has_help(capsys):
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(COMMANDS) <= set(choices)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert "usage: xtalforge" in capsys.readouterr().out


def test_oracles_lists_installed_state(capsys):
    assert main(["oracles"]) == 0
    out = capsys.readouterr().out
    assert "sevennet" in out and "installed" in out and "gpaw" in out


def test_generate_writes_structures(tmp_path):
    out = tmp_path / "si.extxyz"
    assert main(["generate", "Si8", "-n", "3", "--seed", "1", "--mode", "random", "-o", str(out)]) == 0
    frames = read(out, index=":")
    assert len(frames) == 3 and all(len(f) == 8 for f in frames)


@pytest.mark.parametrize("composition,fragment", [("Qq2", "unknown element"), ("Si0", "positive"), ("Si300", "at most 200")])
def test_bad_composition_exit_code_and_one_line(composition, fragment, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xtalforge.cli", "generate", composition, "-n", "1", "-o", str(tmp_path / "x.extxyz")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]


def test_search_then_report(sw_config_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = sw_config_file.read_text().replace("max_oracle_calls = 20000", "max_oracle_calls = 20000\nmax_candidates = 2")
    sw_config_file.write_text(config)
    assert main(["search", str(sw_config_file), "--out", str(run_dir), "--no-progress"]) == 0
    assert "oracle calls" in capsys.readouterr().out
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").stat().st_size > 1000
    assert list((run_dir / "figures").glob("*.png"))


def test_unknown_config_key_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('composition = "Si8"\n[search]\nmethd = "random"\n')
    assert main(["search", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown key 'search.methd'" in capsys.readouterr().err


def test_report_on_empty_dir_is_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no structures.db" in capsys.readouterr().err
