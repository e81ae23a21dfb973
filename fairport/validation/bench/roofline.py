"""This machine's limits at a model's shapes (memory bandwidth, matmul rates of each product path), and the
floor they put under one decoder step at batch 1: its weights read once at the memory's bandwidth."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from fairport.reference.load import PRECISIONS
from fairport.validation.bench.timing import timed


def roofline(dim: int, ffn: int, rows: list[int], dtypes: list[str], device: str) -> dict:
    """This machine's limits at the model's shapes: memory read bandwidth (a 256 MB reduction), and for each
    dtype the matmul GFLOP/s and weight-read GB/s (256 MB matrix times one row) of torch's default path
    (`F.linear`, what fairseq and transformers use) and of the reference's packed oneDNN path (CPU); for
    int8, of the int8 product (weight bytes counted at one byte a value)."""
    from fairport.reference.fast import PACKABLE_DTYPES, Int8Linear, int8_available, onednn_available, pack_linear

    block = torch.randn(64 << 20, device=device)  # 256 MB
    _, times = timed(block.sum, 10, warmup_s=0.2)
    out = {"memory_read_gbps": block.numel() * 4 / min(times) / 1e9, "matmul_gflops": {}, "weight_read_gbps": {}}
    del block
    for name in dtypes:
        dt = PRECISIONS[name]  # int8: float32 activations
        paths = {"torch": lambda lin: lin}
        if name == "int8":
            paths = {"int8": Int8Linear} if device == "cpu" and int8_available() else {}
        elif device == "cpu" and dt in PACKABLE_DTYPES and onednn_available():
            paths["packed"] = functools.partial(pack_linear, min_numel=0)
        for path, make in paths.items():
            lin = make(linear(ffn, dim, dt, device))
            if lin is None:  # this oneDNN cannot pack this dtype on this processor (bf16 without AVX-512 BF16/BW)
                continue
            for r in rows:
                x = torch.randn(r, dim, dtype=dt, device=device)
                _, times = timed(functools.partial(lin, x), 20, warmup_s=0.2)
                out["matmul_gflops"][f"{path}:{name}:{r}x{dim}x{ffn}"] = 2 * r * dim * ffn / min(times) / 1e9
            rows_256mb = (256 << 20) // (dim * torch.finfo(dt).bits // 8)
            big = make(linear(rows_256mb, dim, dt, device))
            v = torch.randn(1, dim, dtype=dt, device=device)
            _, times = timed(functools.partial(big, v), 10, warmup_s=0.2)
            value_bytes = 1 if path == "int8" else torch.finfo(dt).bits // 8
            out["weight_read_gbps"][f"{path}:{name}"] = rows_256mb * dim * value_bytes / min(times) / 1e9
            del big
    return out


def linear(rows: int, cols: int, dtype, device):
    """A bias-free (rows, cols) linear layer of random weights, for timing products."""
    from torch import nn

    lin = nn.Linear(cols, rows, bias=False, device="meta")
    lin.weight = nn.Parameter(torch.randn(rows, cols, dtype=dtype, device=device), requires_grad=False)
    return lin


def step_weight_bytes(cfg, bytes_per_value: int = 4, matrix_bytes_per_value: int | None = None) -> int:
    """Bytes of weights one incremental decoder step reads: every decoder matrix and vector except the
    token/position tables (a row each) and the cross-attention k/v projections (once per source).
    `matrix_bytes_per_value`: the linear layers' matrices at another width (int8: 1)."""
    model = meta_model(cfg)
    total = 0
    for name, p in model.decoder.named_parameters(remove_duplicate=False):
        if name.startswith(("embed_tokens", "embed_positions")) or ".encoder_attn.k_proj." in name \
                or ".encoder_attn.v_proj." in name:
            continue
        width = matrix_bytes_per_value if matrix_bytes_per_value and p.dim() == 2 else bytes_per_value
        total += p.numel() * width
    return total


def meta_model(cfg):
    from fairport.reference.model import EncoderDecoder

    with torch.device("meta"):
        return EncoderDecoder(cfg)



def cpu_model() -> str:
    """The CPU's model name (packed-weight and int8 gains depend on it: a result is one CPU's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def floors(result: dict, cfg, dtypes: list[str]) -> None:
    """The fp32 (and int8) floor of a batch-1 step in `result`, and how far each side's batch-1 greedy step is
    from it (1.0 = at the floor)."""
    gbps = result["roofline"]["memory_read_gbps"]
    result["batch1_bound_ms_per_step"] = step_weight_bytes(cfg) / (gbps * 1e9) * 1000
    if "int8" in dtypes:  # the same step with its matrices at one byte a value
        result["batch1_int8_bound_ms_per_step"] = step_weight_bytes(cfg, matrix_bytes_per_value=1) / (gbps * 1e9) * 1000
    bounds = {"float32": result["batch1_bound_ms_per_step"], "int8": result.get("batch1_int8_bound_ms_per_step")}
    for row in result["runs"]:
        if row["batch"] == 1 and row["beam"] == 1 and bounds.get(row["dtype"]):
            for side, r in row["sides"].items():
                if side != "fairseq" or row["dtype"] == "float32":  # fairseq's row is its fp32 run
                    r["over_batch1_bound"] = r["ms_per_step"] / bounds[row["dtype"]]
