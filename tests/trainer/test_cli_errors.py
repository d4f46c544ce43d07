"""The engram command's answers to bad arguments: one `engram:` line (or argparse's usage), no traceback."""
import pytest

from engram_kernels.trainer import cli


def test_home_that_is_a_file(tmp_path):
    home = tmp_path / "state"
    home.write_text("not a directory")
    with pytest.raises(SystemExit, match="is a file; use another --home"):
        cli.main(["memory", "list", "--home", str(home)])


def test_rollback_to_a_version_that_does_not_exist(tmp_path):
    (tmp_path / "memory" / "base").mkdir(parents=True)
    (tmp_path / "memory" / "base" / "memory_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="engram: memory version 7 does not exist"):
        cli.main(["memory", "rollback", "7", "--home", str(tmp_path)])


@pytest.mark.parametrize("argv", [["memory", "rollback", "-1"], ["learn", "docs", "--chunk-tokens", "0"]])
def test_out_of_range_numbers_are_usage_errors(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--home", str(tmp_path)])
    assert exit_info.value.code == 2 and "must be an integer >=" in capsys.readouterr().err
