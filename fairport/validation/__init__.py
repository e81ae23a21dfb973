"""Everything that runs the original (fairseq, in its own process) beside the port: the original's worker and
fixtures (`original/`), `fairport verify` (`verify/`), `fairport bench` (`bench/`)."""
