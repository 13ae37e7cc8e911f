"""Shared fixtures: where ../shared lives and a session-wide trace pool."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
MAIN_POOL = SHARED / "data" / "traces" / "r1-distill-qwen-7b-mix.jsonl"
TLDR_POOL = SHARED / "data" / "traces" / "r1-7b-tldr.jsonl"
CODE_POOL = SHARED / "data" / "traces" / "qwen2.5-coder-1.5b-code.jsonl"


@pytest.fixture(scope="session")
def main_pool():
    from clear_core.traces import load_pool

    if not MAIN_POOL.is_file():  # CI and every checkout have ../shared beside them
        raise FileNotFoundError(f"the shared trace pool is missing: {MAIN_POOL}")
    return load_pool(MAIN_POOL)
