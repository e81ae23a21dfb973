"""Small helpers used across fairport."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MB (VmHWM). Not ru_maxrss: on Linux a child's ru_maxrss
    starts from its parent's peak at fork (a child of a 600 MB parent that itself peaks at 14 MB reports 613)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
