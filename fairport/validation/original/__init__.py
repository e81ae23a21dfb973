"""Everything that imports fairseq, run only in subprocesses: the worker that runs the original beside the port
(worker.py; the unsafe-unpickling switch fairseq 0.12 needs under torch >= 2.6 is set only in its environment),
the client and requests that talk to it (protocol.py, no fairseq), and the fixture builder (fixtures.py)."""
