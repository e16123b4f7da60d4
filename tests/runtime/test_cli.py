"""experiments.runtime.cli: exit statuses and one-line messages (in process)."""

from __future__ import annotations

import gin
import pytest

from experiments.runtime import cli
from experiments.runtime.workdir_lock import WorkdirLockedError, check_workdir


@gin.configurable
def _cli_test_layer(k: int = 2, num_experts: int = 4):
    if k > num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")


@gin.configurable
def _cli_test_parent(k: int | None = None):
    _cli_test_layer(k=k)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _error_of(fn) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn()
    return info.value


def test_gin_call_notes_become_the_parameter_name():
    gin.bind_parameter("_cli_test_layer.k", 5)
    error = _error_of(_cli_test_layer)
    assert "\n" in str(error)  # gin's "In call to configurable" note
    assert cli.one_line(error) == "_cli_test_layer.k must be in [1, num_experts=4], got 5"
    assert cli.exit_code(error) == 2


def test_a_callers_binding_is_named():
    gin.bind_parameter("_cli_test_parent.k", 5)
    message = cli.one_line(_error_of(_cli_test_parent))
    assert message.startswith("_cli_test_layer.k must be in")
    assert message.endswith("(set by _cli_test_parent.k)")


def test_exit_codes():
    assert cli.exit_code(WorkdirLockedError("busy")) == 3
    assert cli.exit_code(cli.CliError("x", 143)) == 143
    assert cli.exit_code(KeyboardInterrupt()) == 130
    assert cli.exit_code(FileNotFoundError(2, "No such file or directory", "a.gin")) == 2
    assert cli.exit_code(RuntimeError("a bug")) is None
    assert cli.exit_code(OSError("disk full")) is None
    assert cli.one_line(FileNotFoundError(2, "No such file or directory", "a.gin")) == (
        "No such file or directory: a.gin")


def test_entry_point_reports_one_line_and_reraises_bugs(capsys):
    @cli.entry_point
    def refuses(argv=None):
        raise ValueError("MoeLayer.k must be in [1, 4], got 5\n  more detail")

    @cli.entry_point
    def crashes(argv=None):
        raise RuntimeError("a bug")

    assert refuses([]) == 2
    assert capsys.readouterr().err == "error: MoeLayer.k must be in [1, 4], got 5 more detail\n"
    assert refuses(["--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="a bug"):
        crashes([])


def test_argument_errors_are_one_line(capsys):
    parser = cli.ArgumentParser(prog="x.py")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--n", "two"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --n") and "x.py --help" in err
    assert parser.parse_args(["--verbose"]).verbose


def test_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_workdir(tmp_path / "f")
    with pytest.raises(NotADirectoryError, match="is under the file"):
        check_workdir(tmp_path / "f" / "run")
    check_workdir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
