"""`clear-llm predictor` command line: the one list syntax for --traces, defaults in the help, one-line errors."""

from __future__ import annotations

import json

from clear_predictor import cli
from tests.cli_support import assert_one_line_error, run_cli

from predictor_helpers import write_pool


def test_traces_take_commas_spaces_or_several_arguments(tmp_path):
    spaced = tmp_path / "my pool.jsonl"
    spaced.write_text("")
    parser = cli.build_parser()
    forms = [["a.jsonl,b.jsonl"], ["a.jsonl b.jsonl"], ["a.jsonl", "b.jsonl"]]
    for traces in forms:
        args = parser.parse_args(["predictor", "crossval", "--traces", *traces, "--out", "o.jsonl"])
        assert args.traces == ["a.jsonl", "b.jsonl"]
    args = parser.parse_args(["predictor", "train", "--traces", str(spaced), "--out", "d"])
    assert args.traces == [str(spaced)]  # an existing file is never split at its space


def test_two_quoted_pools_run_as_one_dataset(tmp_path):
    a = write_pool(tmp_path / "a.jsonl", n=12, id_prefix="a")
    b = write_pool(tmp_path / "b.jsonl", n=12, seed=3, id_prefix="b")
    out = tmp_path / "oof.jsonl"
    assert cli.main(["predictor", "crossval", "--traces", f"{a} {b}", "--folds", "2", "--model", "length",
                     "--out", str(out)]) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == 24 and len(set(ids)) == 24


def test_the_help_shows_defaults():
    proc = run_cli("-m", "clear_llm", "predictor", "crossval", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "folds, grouped by problem (default: 5)" in text and "(default: transformer)" in text
    assert "comma- or space-separated" in text


def test_errors_are_one_line(tmp_path):
    proc = run_cli("-m", "clear_llm", "predictor", "crossval", "--traces", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path / "o.jsonl"), "--model", "length")
    assert "nope.jsonl" in assert_one_line_error(proc, "clear-llm: error:")
    proc = run_cli("-m", "clear_llm", "predictor", "crossval", "--traces", "p.jsonl", "--out", "o.jsonl",
                   "--folds", "0")
    assert_one_line_error(proc, "clear-llm predictor crossval: error: argument --folds", usage=True)
    proc = run_cli("-m", "clear_predictor.cli", "predictor", "evaluate", "--predictions", str(tmp_path / "x.jsonl"),
                   "--traces", str(tmp_path / "y.jsonl"))
    assert_one_line_error(proc, "python -m clear_predictor.cli: error:")
