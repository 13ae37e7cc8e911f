"""docs/embedding.md runs: its python blocks are executed in order as one program, and every
output the page claims (a ``# -> text`` comment on a print line) must be what it prints."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
CLAIM = re.compile(r"#\s*->\s*(.*?)\s*$")


@pytest.fixture(scope="module")
def blocks(ops) -> list[str]:
    path = ops.REPO / "docs" / "embedding.md"
    if not path.is_file():
        pytest.fail("docs/embedding.md is missing", pytrace=False)
    return FENCE.findall(path.read_text())


def _claims(blocks: list[str]) -> list[str]:
    out = []
    for block in blocks:
        for line in block.splitlines():
            m = CLAIM.search(line)
            if m:
                assert "print(" in line, f"an output claim must sit on a print line: {line.strip()!r}"
                out.append(m.group(1))
    return out


@pytest.fixture(scope="module")
def run(blocks):
    namespace: dict = {"__name__": "embedding_doc"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        for block in blocks:
            exec(compile(block, "docs/embedding.md", "exec"), namespace)
    return namespace, stdout.getvalue().splitlines()


def test_the_page_has_its_examples(blocks):
    assert len(blocks) >= 5
    assert len(_claims(blocks)) >= 15


def test_every_claimed_output_is_what_the_code_prints(blocks, run):
    _, printed = run
    claims = _claims(blocks)
    assert printed == claims, "docs/embedding.md says one thing and its code prints another"


def test_the_books_the_examples_leave_keep_the_invariant(run):
    from clear_core import TokenLedger

    namespace, _ = run
    ledgers = [v for v in namespace.values() if isinstance(v, TokenLedger)]
    assert len(ledgers) >= 4
    for ledger in ledgers:
        state = ledger.state()
        assert state.invariant_holds and state.reconciles
    assert namespace["st"].in_flight == 0  # the server example settled every reservation

