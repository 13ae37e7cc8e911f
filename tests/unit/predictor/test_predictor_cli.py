"""The ``predictor`` CLI end to end on synthetic pools and a tiny local backbone."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from clear_predictor import cli

from predictor_helpers import write_pool


def test_train_predict_evaluate_with_a_local_backbone(tmp_path, tiny_backbone_dir, capsys):
    pool = write_pool(tmp_path / "pool.jsonl", n=30)
    other = write_pool(tmp_path / "other.jsonl", n=12, seed=3, id_prefix="x")
    ckpt = tmp_path / "ckpt"
    rc = cli.main(["predictor", "train", "--traces", str(pool), "--out", str(ckpt), "--backbone", str(tiny_backbone_dir),
                   "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--max-length", "64", "--seed", "1",
                   "--device", "cpu", "--no-progress", "--val-fraction", "0.2"])
    assert rc == 0
    meta = json.loads((ckpt / "training_metadata.json").read_text())
    assert meta["epochs"] == 2 and meta["seed"] == 1 and meta["backbone"] == str(tiny_backbone_dir)
    assert meta["n_train"] == 24 and meta["n_val"] == 6 and meta["log_sigma"] > 0

    out = tmp_path / "pred.jsonl"
    assert cli.main(["predictor", "predict", "--model", str(ckpt), "--traces", str(other), "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12 and {r["id"] for r in rows} == {f"{d}/x{i}" for i, d in enumerate(_datasets(12))}
    assert all(r["threshold_tokens"] > 0 and np.isfinite(r["threshold_tokens"]) for r in rows)
    assert all(r["log_sigma"] == pytest.approx(meta["log_sigma"]) for r in rows)

    capsys.readouterr()
    mjson = tmp_path / "m.json"
    assert cli.main(["predictor", "evaluate", "--predictions", str(out), "--traces", str(other), "--json", str(mjson)]) == 0
    text = capsys.readouterr().out
    assert "12/12 problems covered" in text and "| overall |" in text
    assert json.loads(mjson.read_text())["metrics"]["per_query"]["overall"]["n"] == 12 + 3 * 7


def _datasets(n):
    return ["amc23" if i % 5 == 0 else ("math500" if i % 2 else "gsm8k") for i in range(n)]


@pytest.mark.parametrize("model", ["tfidf", "length"])
def test_crossval_writes_oof_predictions_and_metrics(tmp_path, model, capsys):
    pool = write_pool(tmp_path / "pool.jsonl", n=40)
    out = tmp_path / f"oof-{model}.jsonl"
    assert cli.main(["predictor", "crossval", "--traces", str(pool), "--folds", "4", "--out", str(out), "--model", model]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    report = json.loads((tmp_path / f"oof-{model}.metrics.json").read_text())
    assert report["model"] == model and report["folds"] == 4
    assert rows[0]["log_sigma"] == pytest.approx(report["metrics"]["per_query"]["overall"]["rmse_log"])
    assert "per query" in capsys.readouterr().out


def test_crossval_transformer_with_tiny_backbone(tmp_path, tiny_backbone_dir):
    pool = write_pool(tmp_path / "pool.jsonl", n=20)
    out = tmp_path / "oof-t.jsonl"
    assert cli.main(["predictor", "crossval", "--traces", str(pool), "--folds", "2", "--out", str(out),
                     "--backbone", str(tiny_backbone_dir), "--epochs", "1", "--batch-size", "8",
                     "--max-length", "32", "--device", "cpu", "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 20


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["predictor", "evaluate", "--predictions", str(tmp_path / "nope.jsonl"),
                     "--traces", str(tmp_path / "nope.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "gsm8k/0", "threshold_tokens": -3}\n')
    pool = write_pool(tmp_path / "pool.jsonl", n=5)
    assert cli.main(["predictor", "evaluate", "--predictions", str(bad), "--traces", str(pool)]) == 2


def test_add_subcommands_plugs_into_another_parser():
    parser = argparse.ArgumentParser(prog="clear-llm")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    cli.add_subcommands(sub)
    args = parser.parse_args(["predictor", "crossval", "--traces", "a.jsonl", "--out", "o.jsonl", "--model", "tfidf"])
    assert args.func is cli.cmd_crossval and args.folds == 5 and args.batch_size == 32 and args.max_length == 512
    args = parser.parse_args(["predictor", "train", "--traces", "a", "b", "--out", "d"])
    assert args.traces == ["a", "b"] and args.lr == 2e-5 and args.epochs == 10 and args.backbone is None
    with pytest.raises(SystemExit):
        parser.parse_args(["predictor", "crossval", "--traces", "a", "--out", "o", "--model", "bert"])


def test_training_defaults_come_from_train_config():
    """One source per default: the options a user leaves out are TrainConfig's."""
    from clear_predictor.config import DEFAULT_EVAL_BATCH_SIZE, TrainConfig

    parser = cli.build_parser()
    train = parser.parse_args(["predictor", "train", "--traces", "a", "--out", "d"])
    assert cli._train_config(train) == TrainConfig()
    assert train.val_fraction == cli.DEFAULT_VAL_FRACTION
    crossval = parser.parse_args(["predictor", "crossval", "--traces", "a", "--out", "o"])
    assert cli._train_config(crossval) == TrainConfig(epochs=cli.CROSSVAL_EPOCHS)
    predict = parser.parse_args(["predictor", "predict", "--model", "m", "--traces", "a", "--out", "o"])
    assert predict.batch_size == DEFAULT_EVAL_BATCH_SIZE == TrainConfig().eval_batch_size
    assert predict.device == TrainConfig().device
    quiet = parser.parse_args(["predictor", "train", "--traces", "a", "--out", "d", "--no-progress", "--seed", "4"])
    assert cli._train_config(quiet) == TrainConfig(progress=False, seed=4)
