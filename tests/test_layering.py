"""The core stands alone: importing the library pulls in no web, config, metrics or
Redis code, and the core modules import only trio, attrs, sortedcontainers and their
own package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sessiongate"
CORE = [
    SRC / "__init__.py",
    SRC / "_gate.py",
    SRC / "_errors.py",
    SRC / "_limits.py",
    SRC / "_stats.py",
    SRC / "backends" / "__init__.py",
    SRC / "backends" / "_base.py",
    SRC / "backends" / "memory.py",
]
ALLOWED = {"trio", "attrs", "sortedcontainers", "__future__", "collections", "contextlib",
           "inspect", "itertools", "math", "re", "reprlib", "secrets", "types", "typing",
           "warnings"}  # fmt: skip


def test_importing_the_library_loads_no_web_or_redis_code() -> None:
    probe = (
        "import sys, sessiongate\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "{'quart', 'quart_trio', 'hypercorn', 'coredis', 'prometheus_client'}"
        " or m.startswith(('sessiongate.web', 'sessiongate.config', 'sessiongate.cli'))]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_imports(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package
                assert not (node.module or "").startswith(("web", "config", "cli", "metrics"))
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in ALLOWED, f"{path.name} imports {name}"
