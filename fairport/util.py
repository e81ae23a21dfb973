"""Small helpers used across fairport."""

from __future__ import annotations

import os
import subprocess
import sys


def first_line(e: BaseException) -> str:
    """An exception's first line, for one-line errors (its type name when it has no message)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def comma_list(value) -> list[str]:
    """fairseq's comma-separated option values ('en,de') or lists, as a list of non-empty strings."""
    if isinstance(value, str):
        return [x for x in value.split(",") if x]
    return [str(x) for x in value or []]


def run_module(module: str, *args: str, env: dict | None = None, timeout: float | None = None,
               capture: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """`python -m module args...` in a fresh process (fairseq's import warnings silenced); `env` adds to ours."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=capture, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}, timeout=timeout, cwd=cwd)


def stderr_tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((proc.stderr or "").strip().splitlines()[-lines:])
