"""The original's workers started without paying for fairseq's import each time (~4 s of a worker's start on a
small checkpoint), for sessions that start many originals one after the other (the test suite: every parity
test, every verify): `python -m fairport.validation.original.forkserver SOCKET` imports fairseq once, then forks
one worker per request. `Original` (protocol.py) asks it when the environment names its socket
(FAIRPORT_ORIGINAL_FORKSERVER) and it answers; otherwise, and for users, each worker is a fresh interpreter.

A forked worker is the process the fresh one would be: its own pid, the caller's environment, working directory,
stdin/stdout/stderr (the caller's pipe ends, passed over the socket) and thread count; it runs the worker's
`main` and exits with its status, which the server sends back on the request's connection. The server ends
when its stdin closes (the session that started it ended).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ENV = "FAIRPORT_ORIGINAL_FORKSERVER"


class ForkedWorker:
    """A worker the server forked, driven like the `subprocess.Popen` a fresh worker is (stdin, stdout, poll,
    wait, kill, returncode)."""

    def __init__(self, pid: int, conn: socket.socket, stdin, stdout):
        self.pid, self.conn, self.stdin, self.stdout = pid, conn, stdin, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.conn], [], [], 0)[0]:
            self.returncode = int(self.conn.recv(64) or b"-9")
            self.conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not select.select([self.conn], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(f"forked worker {self.pid}", timeout)
        return self.poll()

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()


def start(folder: Path, env: dict, stderr) -> ForkedWorker | None:
    """A worker for job folder `folder` forked by the server env[ENV] names; None when there is none (or it does
    not answer): the caller starts a fresh one."""
    path = env.get(ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    request = {"folder": str(folder), "env": env, "cwd": os.getcwd()}
    try:
        socket.send_fds(conn, [json.dumps(request).encode()], [in_r, out_w, stderr.fileno()])
        reply = conn.recv(64)
    except OSError:
        reply = b""
    finally:  # the child has its own copies of these ends (or there is no child)
        os.close(in_r)
        os.close(out_w)
    if not reply.isdigit():
        conn.close()
        os.close(in_w)
        os.close(out_r)
        return None
    pid = int(reply)
    return ForkedWorker(pid, conn, os.fdopen(in_w, "w"), os.fdopen(out_r))


def take_over(fds: list[int], env: dict, cwd: str) -> None:
    """In a forked child: `fds` become its stdin, stdout and stderr (closed under their old numbers), `env` its
    whole environment, `cwd` its working directory: the process a caller would have started."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, open until it exits
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the worker process the request describes, run it, exit (never returns)."""
    code = 1
    try:
        take_over(fds, request["env"], request["cwd"])
        import torch

        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # what a fresh interpreter's torch starts with
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from fairport.validation.original import worker

        worker.main(request["folder"])
        code = 0
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reap(pid: int, conn: socket.socket) -> None:
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        conn.send(str(os.waitstatus_to_exitcode(status)).encode())
    conn.close()


def serve(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)  # before the imports: a worker asked for meanwhile waits for them
    server.listen(64)
    import fairseq.checkpoint_utils  # noqa: F401 - what every worker would import
    import fairseq.models  # noqa: F401
    import fairseq.tasks  # noqa: F401

    from fairport.validation.original import worker  # noqa: F401

    try:
        while True:
            ready, _, _ = select.select([server, sys.stdin], [], [])
            if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
                return
            if server not in ready:
                continue
            conn, _ = server.accept()
            try:
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                request = json.loads(message)
            except (OSError, ValueError):
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            threading.Thread(target=_reap, args=(pid, conn), daemon=True).start()
    finally:
        server.close()
        Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    serve(sys.argv[1])
