"""load_tests drives any OpenAI-compatible endpoint over HTTP: it never imports Ray or the Serve graph."""

import subprocess
import sys


def test_load_tests_import_neither_ray_nor_the_serve_graph():
    code = (
        "import importlib, pkgutil, sys, load_tests\n"
        "for m in pkgutil.iter_modules(load_tests.__path__):\n"
        "    if m.name != '__main__': importlib.import_module('load_tests.' + m.name)\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deployments', 'vllm'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"load_tests pulled in: {out.stdout.strip()}"
