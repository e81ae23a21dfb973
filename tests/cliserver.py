"""Starts `python -m fairport` processes without paying for their imports: this process imports fairport's
command line and torch once (~1.3 s of the ~1.5 s a command that fails early takes), then forks a child per
request. The child is a process of its own (its own session, so a timeout kills it and whatever it started),
with the request's argv, environment, working directory and standard streams; it runs fairport/__main__.py as
`python -m fairport` does and exits with its status (an uncaught exception prints its traceback on stderr and
exits 1, as the interpreter does).

Used by helpers.run_cli for environments that only differ from the test session's in settings read after
import (helpers.FORK_UNSAFE lists the prefixes of those read while importing: those runs get a fresh
interpreter). `--hub`: a second server for `fairport verify`, which has also imported transformers and the rest
of what verify imports (HUB_MODULES). One request at a time, as JSON lines on stdin; the reply is the child's
pid, then its exit status.
"""

from __future__ import annotations

import json
import os
import sys


def child(request: dict, set_by_cli: dict) -> None:
    """In the forked child: become the requested process, run the command line, exit (never returns)."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        from fairport.validation.original.forkserver import take_over

        os.setsid()
        written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        take_over([os.open(request["stdin"] or os.devnull, os.O_RDONLY), os.open(request["stdout"], written),
                   os.open(request["stderr"], written)], request["env"], request["cwd"])
        for key, value in set_by_cli.items():  # what fairport/cli.py sets when imported before torch
            os.environ.setdefault(key, value)
        sys.argv = ["-m", *request["args"]]
        try:
            runpy.run_module("fairport", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
            traceback.print_exc()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


# with --hub, what `fairport verify` imports besides (transformers' models and tokenizers, ROUGE, plots): ~8 s of
# every verify. These read HF_* settings while importing, so helpers.run_cli sends this server only runs whose
# environment has the session's HF_* settings.
HUB_MODULES = ("transformers", "transformers.modeling_utils", "transformers.generation.utils",
               "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
               "transformers.models.bart.modeling_bart", "transformers.models.fsmt.modeling_fsmt",
               "transformers.models.m2m_100.modeling_m2m_100", "transformers.models.mbart.modeling_mbart",
               "rouge_score.rouge_scorer", "sacremoses", "sacrebleu", "matplotlib.pyplot",
               "fairport.validation.verify.run")


def serve(hub: bool) -> None:
    before = dict(os.environ)
    import fairport.cli  # noqa: F401 - sets its environment defaults before torch is imported
    set_by_cli = {k: v for k, v in os.environ.items() if k not in before}
    import contextlib
    import importlib

    import torch  # noqa: F401

    import fairport.reference  # noqa: F401

    if hub:
        for name in HUB_MODULES:
            with contextlib.suppress(ImportError):  # not installed: the child misses it as a fresh process would
                importlib.import_module(name)
    else:  # what reads HF_* settings while importing is left to the child (helpers.HUB_SETTINGS)
        assert not {"huggingface_hub", "transformers"} & set(sys.modules), "cliserver preloads the hub's libraries"

    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            child(json.loads(line), set_by_cli)
        replies.write(f"{pid}\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
        replies.flush()


if __name__ == "__main__":
    serve(hub="--hub" in sys.argv[1:])
