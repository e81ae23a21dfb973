"""bench's worker processes: `python -m fairport.validation.bench --worker JOB` (one side) or
`--throughput-worker JOB` (one rank of the throughput run)."""

import sys

from fairport.errors import FairportError
from fairport.validation.bench.sides import worker_main
from fairport.validation.bench.throughput import throughput_worker

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    try:
        worker_main(sys.argv[2])
    except FairportError as e:  # one line, which the parent passes on
        raise SystemExit(f"fairport: error: {e}") from None
elif len(sys.argv) == 3 and sys.argv[1] == "--throughput-worker":
    throughput_worker(sys.argv[2])
else:
    raise SystemExit("use `fairport bench`")
