""".dockerignore keeps the heavy and private paths out of the image's build context, and
nothing the Dockerfile COPYs; the predictor checkpoint has one spelling everywhere.

The matcher follows Docker's rules: patterns are relative to the context root, ``*`` and
``?`` stay within one path segment, ``**`` spans any number of them, a pattern that
matches a directory excludes everything under it, and the last matching line wins
(``!`` lines re-include)."""

from __future__ import annotations

import re
import subprocess

import pytest

DOCKERFILE = "k8s/image/Dockerfile"


def _regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def parse_dockerignore(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is an exception, regex) per rule, in file order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/").removeprefix("./")
        rules.append((negate, _regex(pattern)))
    return rules


def excluded(rules, path: str) -> bool:
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    verdict = False
    for negate, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


@pytest.fixture(scope="module")
def rules(ops):
    path = ops.REPO / ".dockerignore"
    if not path.is_file():
        pytest.fail(".dockerignore is missing: `docker build .` would send the virtualenv", pytrace=False)
    return parse_dockerignore(path.read_text())


def _dockerfile_copies(ops) -> list[str]:
    """Sources of every COPY, with ARG defaults substituted."""
    text = (ops.REPO / DOCKERFILE).read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    sources = []
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        words = [w for w in line.split() if not w.startswith("--")]
        for src in words[:-1]:
            sources.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], src))
    return sources


def _tracked(ops, under: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", under], cwd=ops.REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"this check reads the tracked files: git ls-files failed: {out.stderr.strip()}", pytrace=False)
    return out.stdout.split()


def test_the_matcher_follows_dockers_rules():
    rules = parse_dockerignore("a\n**/__pycache__\n*.log\n!keep.log\nout/*\n!out/x\n")
    assert excluded(rules, "a") and excluded(rules, "a/b/c")
    assert not excluded(rules, "ab") and not excluded(rules, "b/a")
    assert excluded(rules, "__pycache__/m.pyc") and excluded(rules, "p/q/__pycache__/m.pyc")
    assert excluded(rules, "x.log") and not excluded(rules, "keep.log") and not excluded(rules, "d/x.log")
    assert excluded(rules, "out/y") and not excluded(rules, "out/x/z")


@pytest.mark.parametrize("path", [
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".git/HEAD",
    ".git",  # a worktree's .git is a file
    "artifacts/bench-oracle-noise-0.5/results.json",
    "artifacts/tiny-llm/model.safetensors",
    "clear_core/__pycache__/budget.cpython-311.pyc",
    "deployments/engines/__pycache__/replay.cpython-311.pyc",
    ".pytest_cache/README.md",
    ".hypothesis/examples/x",
    "clear_llm.egg-info/PKG-INFO",
    "build/lib/clear_core/market.py",
    "dist/clear_llm-0.1.0-py3-none-any.whl",
])
def test_heavy_and_private_paths_are_excluded(rules, path):
    assert excluded(rules, path), f"{path} would be sent to the Docker daemon"


def test_nothing_the_dockerfile_copies_is_excluded(rules, ops):
    sources = _dockerfile_copies(ops)
    assert {"pyproject.toml", "clear_core", "deployments"} <= set(sources)
    for src in sources:
        assert not excluded(rules, src), f"{DOCKERFILE} copies {src}, which .dockerignore excludes"
        for path in _tracked(ops, src):
            assert not excluded(rules, path), f"{path} (under COPY {src}) is excluded by .dockerignore"
    checkpoint = next(s for s in sources if s.startswith("artifacts/"))
    assert not excluded(rules, f"{checkpoint}/config.json")


def test_the_predictor_checkpoint_has_one_spelling(ops):
    """The Dockerfile's default is where README's `predictor train` writes, and every doc says so."""
    (default,) = re.findall(r"^ARG PREDICTOR_CHECKPOINT=(\S+)", (ops.REPO / DOCKERFILE).read_text(), re.M)
    readme = (ops.REPO / "README.md").read_text()
    (trained,) = re.findall(r"clear-llm predictor train .*--out (\S+)", readme)
    assert default == trained
    names = set()
    for rel in ("README.md", "docs/operations.md", "clear_predictor/README.md", DOCKERFILE):
        names |= set(re.findall(r"artifacts/(?:clear-)?predictor(?:-\w+)?", (ops.REPO / rel).read_text()))
    assert names == {default}, f"checkpoint spelled {sorted(names)}"
