"""Run the fairseq originals beside the port: fixtures, parity, reports."""
