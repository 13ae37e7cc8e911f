"""The command-line conventions every CLI shares: one list syntax, defaults in the help, one-line errors."""

from __future__ import annotations

import argparse
import errno

import pytest

from clear_core.cli_args import (
    INTERRUPTED, USAGE_ERROR, HelpFormatter, UsageError, add_list_argument, list_of, make_dir, path_list,
    positive_int, run_command, split_items,
)
from clear_core.errors import InvalidInputError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tool", formatter_class=HelpFormatter)
    add_list_argument(p, "--budgets", kind=positive_int, what="positive token counts", default="256,512",
                      help="tokens per query")
    add_list_argument(p, "--names", help="some names")
    add_list_argument(p, "--target", repeatable=True, help="repeatable")
    p.add_argument("--seed", type=int, default=0, help="a seed")
    p.add_argument("--model", default=None, help="a model")
    p.add_argument("--quiet", action="store_true", help="less output")
    return p


@pytest.mark.parametrize("argv", [["--budgets", "128,1024"], ["--budgets", "128 1024"], ["--budgets", "128", "1024"],
                                  ["--budgets", " 128 , 1024 "], ["--budgets", "128,", "1024"]])
def test_commas_spaces_and_separate_arguments_are_one_list_syntax(argv):
    assert _parser().parse_args(argv).budgets == [128, 1024]


def test_a_list_default_is_given_as_text_and_parsed_like_an_argument():
    args = _parser().parse_args([])
    assert args.budgets == [256, 512] and args.names is None and args.target is None


def test_a_repeatable_list_adds_up_and_a_plain_one_is_replaced():
    args = _parser().parse_args(["--target", "a,b", "--target", "c", "--names", "x", "--names", "y z"])
    assert args.target == ["a", "b", "c"] and args.names == ["y", "z"]


@pytest.mark.parametrize("bad", ["abc", "0", "256 -1", ","])
def test_a_bad_item_is_an_argparse_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--budgets", bad])
    assert exc.value.code == USAGE_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tool: error: argument --budgets: expected positive token counts")


def test_split_and_convert():
    assert split_items("a, b\tc,,d ") == ["a", "b", "c", "d"]
    assert list_of(float)("1.5 2") == [1.5, 2.0]


def test_an_existing_path_with_a_space_is_one_item(tmp_path):
    spaced = tmp_path / "my pool, v2.jsonl"
    spaced.write_text("")
    assert path_list(str(spaced)) == [str(spaced)]
    assert path_list("a.jsonl b.jsonl") == ["a.jsonl", "b.jsonl"]


def test_the_help_shows_defaults_and_the_list_syntax():
    text = " ".join(_parser().format_help().split())
    assert "tokens per query (comma- or space-separated) (default: 256,512)" in text
    assert "a seed (default: 0)" in text
    assert "a model (default" not in text and "less output (default" not in text  # nothing to show


def test_make_dir_refuses_a_folder_it_cannot_create(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"argument --out: cannot write to .*file/out"):
        make_dir(blocker / "out")
    assert make_dir(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("exc, line", [
    (UsageError("argument --x: bad"), "tool: error: argument --x: bad"),
    (InvalidInputError("n", 0, "must be positive"), "tool: error: invalid n=0: must be positive"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "p.jsonl"),
     "tool: error: p.jsonl: No such file or directory"),
])
def test_run_command_turns_a_users_error_into_one_line(exc, line, capsys):
    def fail():
        raise exc

    assert run_command("tool", fail) == USAGE_ERROR
    assert capsys.readouterr().err == line + "\n"


def test_run_command_interrupted_and_success(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_command("tool", interrupted) == INTERRUPTED
    assert capsys.readouterr().err == "tool: interrupted\n"
    assert run_command("tool", lambda: None) == 0 and run_command("tool", lambda: 3) == 3


def test_run_command_keeps_the_traceback_of_a_bug():
    def bug():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_command("tool", bug)
