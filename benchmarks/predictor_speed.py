"""Inference speed of the threshold predictor: prompts per second by batch size.

    python benchmarks/predictor_speed.py --model artifacts/predictor-minilm
    python benchmarks/predictor_speed.py --shipped-head   # the minilm-ridge serving backend
    python benchmarks/predictor_speed.py            # untrained head on the default backbone

Prompts are real problem statements of the main pool (cycled to fill the
batches), so lengths follow the serving distribution. Each batch size runs on
CPU, and on CUDA when available; tokenisation is included in the time. With
``--shipped-head`` each batch is one call of the serving backend
(``deployments.predictor_backends.MiniLMRidgePredictor``: encoder, shipped
head, calibration, ``Prediction`` objects) on prompts in arrival order, as the
predictor's batches (``deployments.waiting_batch``) hand them over.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clear_core.cli_args import HelpFormatter, UsageError, add_list_argument, positive_int, run_command  # noqa: E402

DEFAULT_POOL = ROOT.parent / "shared" / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"


def _prompts(pool: Path, n: int, seed: int) -> list[str]:
    from clear_core.traces import load_pool

    texts = [p.problem for p in load_pool(pool)]
    idx = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in np.resize(idx, n)]


def _predictor(model_dir: str | None, device: str, max_length: int):
    import torch  # noqa: F401

    from clear_predictor.inference import ThresholdPredictor
    from clear_predictor.model import TrainingMetadata, build_regressor

    if model_dir:
        return ThresholdPredictor.from_checkpoint(model_dir, device=device)
    model, tok, backbone = build_regressor(None, max_length)
    meta = TrainingMetadata(backbone=backbone, seed=0, epochs=0, batch_size=0, lr=0.0, head_lr=0.0, weight_decay=0.0,
                            max_length=max_length, n_train=0, n_val=0, log_sigma=float("nan"), log_sigma_source="none")
    return ThresholdPredictor(model, tok, meta, device=device)


class _ServingBackend:
    """The minilm-ridge backend behind ``predict(prompts)``: one backend call per ``batch_size`` prompts."""

    def __init__(self, device: str):
        from deployments.predictor_backends import MiniLMRidgePredictor

        self.backend = MiniLMRidgePredictor(device=device)
        self.batch_size = 1

    def predict(self, prompts):
        return [p for i in range(0, len(prompts), self.batch_size)
                for p in self.backend.predict(prompts[i:i + self.batch_size])]


def run(model_dir, batch_sizes, devices, pool, n_prompts, repeats, max_length, threads, shipped_head=False) -> list[dict]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for device in devices:
        pred = _ServingBackend(device) if shipped_head else _predictor(model_dir, device, max_length)
        for bs in batch_sizes:
            n = max(bs, n_prompts)
            prompts = _prompts(pool, n, seed=0)  # the same prompts for every batch size
            pred.batch_size = bs
            pred.predict(prompts[: bs])  # warm-up
            best = float("inf")
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                pred.predict(prompts)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            rows.append({"device": device, "batch_size": bs, "prompts": n, "seconds": best,
                         "prompts_per_s": n / best, "ms_per_batch": 1000 * best / (n / bs)})
            print(f"  {device} batch {bs}: {n / best:.1f} prompts/s", file=sys.stderr, flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/predictor_speed.py", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: untrained head on the default backbone)")
    ap.add_argument("--shipped-head", action="store_true",
                    help="time the minilm-ridge serving backend (the head shipped in clear_predictor) instead")
    add_list_argument(ap, "--batch-sizes", kind=positive_int, what="positive integers", metavar="N",
                      default="1,8,32,128", help="prompts per forward pass")
    add_list_argument(ap, "--device", metavar="DEVICE", repeatable=True,
                      help="cpu / cuda, repeatable (default: cpu, plus cuda if available)")
    ap.add_argument("--traces", default=str(DEFAULT_POOL), help="pool whose prompts are used")
    ap.add_argument("--prompts", type=positive_int, default=256,
                    help="prompts per timing, the same for every batch size (at least one batch)")
    ap.add_argument("--repeats", type=positive_int, default=2, help="timings per cell; the best is kept")
    ap.add_argument("--max-length", type=positive_int, default=512, help="without --model: tokens kept")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's own choice)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


def _run(args) -> int:

    import torch

    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if args.shipped_head and args.model:
        raise UsageError("give --model or --shipped-head, not both")
    rows = run(args.model, args.batch_sizes, devices, Path(args.traces), args.prompts, args.repeats, args.max_length,
               args.threads, args.shipped_head)
    what = "minilm-ridge serving backend (shipped head)" if args.shipped_head else (args.model or "default backbone, untrained head")
    print(f"model: {what}; torch threads: {torch.get_num_threads()}")
    print("| device | batch | prompts | prompts/s | ms/batch |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['device']} | {r['batch_size']} | {r['prompts']} | {r['prompts_per_s']:.1f} | {r['ms_per_batch']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
