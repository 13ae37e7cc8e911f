"""Docs, configs, scripts and examples name paths relative to the checkout (``../shared``,
``artifacts/...``), never a path of the machine they were written on."""

from __future__ import annotations

import re
import subprocess

import pytest

#: A home or workspace directory of some machine. /home/ray is the user of Ray's images (k8s).
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|Users|root|home/(?!ray\b)[\w.-]+|mnt|scratch)/")
CHECKED = re.compile(r"(\.md|\.ya?ml|\.toml|Makefile|Dockerfile|\.dockerignore|^scripts/.*\.py|^examples/.*\.py"
                     r"|^benchmarks/.*\.py|^\.ci/.*)$")


def _tracked(ops) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ops.REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"this check reads the tracked files: git ls-files failed: {out.stderr.strip()}", pytrace=False)
    return out.stdout.split()


def test_the_pattern_finds_machine_paths_and_spares_relative_ones():
    assert MACHINE_PATH.search("P=/work/shared/data/x.jsonl")
    assert MACHINE_PATH.search("see /home/alice/clear/README.md")
    assert not MACHINE_PATH.search("P=../shared/data/x.jsonl")
    assert not MACHINE_PATH.search("mountPath: /home/ray/.cache/huggingface")
    assert not MACHINE_PATH.search("cat /tmp/ray/session_latest/metrics_export_port_*")


def test_no_machine_paths_in_docs_configs_and_scripts(ops):
    files = [f for f in _tracked(ops) if CHECKED.search(f)]
    assert "README.md" in files and "clear_predictor/README.md" in files
    hits = []
    for rel in files:
        for n, line in enumerate((ops.REPO / rel).read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "machine paths (use ../shared or a path relative to the checkout):\n" + "\n".join(hits)
