"""Helpers of the predictor tests: a tiny random BERT built locally (no network), synthetic pools."""

from __future__ import annotations

import json
import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (the predictor extra; CI installs it: a missing torch must fail, not skip)
import transformers  # noqa: E402

WORDS = (
    "the a of and to in is what find how many if then number sum total each solve compute prove "
    "integer real triangle circle area angle square root prime answer long short easy hard apples "
    "has gives buys sells per day week dollars let x y z n m"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("0123456789+-*/=().,?$^")


def _repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "clear_predictor").is_dir():
            return parent
    raise RuntimeError("repository root not found above " + str(here))


REPO_ROOT = _repo_root()
SHARED = Path(os.environ.get("CLEAR_SHARED", REPO_ROOT.parent / "shared")).resolve()
MAIN_POOL = SHARED / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"


def make_tiny_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS + CHARS) + "\n", encoding="utf-8")
    tokens = SPECIAL + WORDS + CHARS
    # transformers 5 takes the vocabulary itself (``vocab=``); 4.x took ``vocab_file=``.
    try:
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    except TypeError:  # pragma: no cover - transformers 4.x
        tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    if tok.convert_tokens_to_ids("hard") == tok.unk_token_id:  # pragma: no cover
        tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    return tok


def make_tiny_encoder(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg)


def synthetic_texts(n: int, seed: int = 0):
    """Prompts whose log length is 4 + 1.5 * [contains 'hard'] + 0.02 * words, and targets."""
    import numpy as np

    rng = np.random.default_rng(seed)
    texts, y = [], []
    for _ in range(n):
        k = int(rng.integers(1, 6))
        words = list(rng.choice(WORDS[:20], size=k))
        hard = bool(rng.random() < 0.5)
        words.insert(int(rng.integers(0, k)), "hard" if hard else "easy")
        texts.append(" ".join(words))
        y.append(4.0 + 1.5 * hard + 0.02 * k)
    return texts, np.asarray(y)


def write_pool(path: Path, n: int = 40, seed: int = 0, samples_for_amc: int = 8, id_prefix: str = "") -> Path:
    """A synthetic pool in the shared/data/traces schema."""
    import numpy as np

    texts, y = synthetic_texts(n, seed)
    rng = np.random.default_rng(seed + 1)
    with path.open("w", encoding="utf-8") as fh:
        for i, (t, v) in enumerate(zip(texts, y)):
            ds = "amc23" if i % 5 == 0 else ("math500" if i % 2 else "gsm8k")
            k = samples_for_amc if ds == "amc23" else 1
            toks = np.maximum(1, np.exp(v + rng.normal(0, 0.2, size=k))).astype(int)
            fh.write(json.dumps({
                "id": f"{ds}/{id_prefix}{i}", "dataset": ds, "level": 3 if ds == "math500" else None,
                "subject": None, "problem": t, "answer": "1",
                "samples": [{"tokens": int(x), "correct": True, "truncated": False} for x in toks],
            }) + "\n")
    return path
