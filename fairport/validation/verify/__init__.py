"""Checking a port against its fairseq original: `fairport verify` (run.py) and its report."""
