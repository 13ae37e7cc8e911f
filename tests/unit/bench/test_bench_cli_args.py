"""`clear-llm bench` command line: the one list syntax, defaults in the help, one-line errors, no bars in logs."""

from __future__ import annotations

import json

import pytest

from clear_llm.cli import build_parser
from tests.cli_support import assert_one_line_error, run_cli
from tests.conftest import MAIN_POOL


def _bench(*argv: str):
    return build_parser().parse_args(["bench", "--traces", str(MAIN_POOL), "--out", "o", *argv])


def test_budgets_seeds_streams_and_policies_take_commas_or_spaces():
    commas = _bench("--budgets", "256,512", "--seeds", "0,1", "--streams", "balanced,u-shaped",
                    "--policies", "uniform,clear-paper:beta=0.01,alpha=4,clear")
    spaces = _bench("--budgets", "256 512", "--seeds", "0 1", "--streams", "balanced u-shaped",
                    "--policies", "uniform clear-paper:beta=0.01,alpha=4 clear")
    for key in ("budgets", "seeds", "streams", "policies"):
        assert getattr(commas, key) == getattr(spaces, key)
    assert commas.budgets == [256, 512] and commas.policies == ["uniform", "clear-paper:beta=0.01,alpha=4", "clear"]


def test_the_help_shows_defaults_and_the_list_syntax():
    proc = run_cli("-m", "clear_llm", "bench", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "(default: 256,512,1024,2048,4096)" in text and "(default: 0,1,2,3,4)" in text
    assert "(default: 500)" in text and "comma- or space-separated" in text


@pytest.mark.parametrize("argv, prefix", [
    (["--budgets", "256 abc"], "clear-llm bench: error: argument --budgets"),
    (["--budgets", "0"], "clear-llm bench: error: argument --budgets"),
    (["--queries", "0"], "clear-llm bench: error: argument --queries"),
    (["--k", "0"], "clear-llm bench: error: argument --k"),
    (["--policies", "uniform,bogus"], "clear-llm bench: error: argument --policies"),
])
def test_a_bad_value_is_argparses_one_line_error(argv, prefix, tmp_path):
    proc = run_cli("-m", "clear_llm", "bench", "--traces", str(MAIN_POOL), "--out", str(tmp_path), *argv)
    assert_one_line_error(proc, prefix, usage=True)


def test_a_missing_pool_an_unwritable_out_and_an_unknown_stream_are_one_line(tmp_path):
    proc = run_cli("-m", "clear_llm", "bench", "--traces", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path))
    assert "nope.jsonl: No such file or directory" in assert_one_line_error(proc, "clear-llm: error:")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("-m", "clear_llm", "bench", "--traces", str(MAIN_POOL), "--out", str(blocker / "out"))
    assert_one_line_error(proc, "clear-llm: error: argument --out: cannot write to")
    proc = run_cli("-m", "clear_llm", "bench", "--traces", str(MAIN_POOL), "--out", str(tmp_path),
                   "--streams", "balanced,bogus")
    assert_one_line_error(proc, "clear-llm: error: argument --streams: unknown stream 'bogus'")


def test_a_quoted_space_separated_list_runs_and_no_bar_reaches_a_redirected_stderr(tmp_path):
    proc = run_cli("-m", "clear_llm", "bench", "--traces", str(MAIN_POOL), "--streams", "balanced",
                   "--budgets", "256 1024", "--policies", "uniform clear", "--seeds", "0", "--queries", "40",
                   "--no-figures", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["budget_per_query"], r["policy"]) for r in rows} == {
        (256, "uniform"), (256, "clear"), (1024, "uniform"), (1024, "clear")}
    assert "\r" not in proc.stderr and "cell/s" not in proc.stderr and "it/s" not in proc.stderr  # tqdm: terminals only
