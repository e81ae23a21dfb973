"""Read fairseq checkpoints without importing fairseq and write fairport model folders."""
