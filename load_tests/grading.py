"""Did a request solve its problem?

With the replay engine the service itself reports it (``clear.replay.solved``:
trace semantics, solved iff cap >= recorded length and the sample is correct).
With a real engine the returned text is checked against the reference answer
with the ``math-verify`` package when it is installed, else by comparing the
last ``\\boxed{...}`` with the reference after light normalisation.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def _normalise(s: str) -> str:
    s = s.strip().strip("$").replace(" ", "").replace("\\!", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.rstrip(".")
    return s[:-2] if s.endswith(".0") else s


def last_boxed(text: str) -> str | None:
    found = _BOXED.findall(text or "")
    return found[-1] if found else None


def check_answer(text: str, reference: str) -> bool:
    """True when ``text``'s final answer matches ``reference``."""
    try:  # the well-kept checker first
        from math_verify import parse, verify

        gold = parse(f"${reference}$")
        pred = parse(text)
        if gold and pred:
            return bool(verify(gold, pred))
    except ImportError:
        pass
    boxed = last_boxed(text)
    return boxed is not None and _normalise(boxed) == _normalise(reference)


def solved(response_clear: dict | None, text: str, reference: str) -> bool:
    replay = (response_clear or {}).get("replay")
    if isinstance(replay, dict) and "solved" in replay:
        return bool(replay["solved"])
    return check_answer(text, reference)
