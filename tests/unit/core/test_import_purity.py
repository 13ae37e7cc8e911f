"""clear_core must stay numpy/scipy only (ARCHITECTURE.md, layers)."""

import subprocess
import sys

FORBIDDEN = ("ray", "torch", "transformers", "vllm", "fastapi", "starlette", "matplotlib", "pydantic")


def test_clear_core_imports_no_heavy_dependency():
    code = (
        "import sys, clear_core, clear_core.market, clear_core.policies, clear_core.traces, "
        "clear_core.simulate, clear_core.uncertainty, clear_core.utility\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.iter_modules(clear_core.__path__): importlib.import_module('clear_core.' + m.name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"clear_core pulled in: {out.stdout.strip()}"
