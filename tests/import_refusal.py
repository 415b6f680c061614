"""A setting read at import time refuses an unknown value: the import fails naming it."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def assert_import_refuses(module: str, var: str, value: str, message: str) -> None:
    """`import module` in a fresh interpreter with the environment variable var=value exits
    non-zero with `message` on stderr."""
    env = dict(os.environ, PYTHONPATH=ROOT, **{var: value})
    r = subprocess.run([sys.executable, "-c", f"import {module}"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
