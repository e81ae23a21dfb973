"""What bench times: a configuration (dtype, batch, beam) over a fixed number of decoder steps, and which
precisions each side is timed in."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Config:
    dtype: str
    batch: int
    beam: int
    steps: int  # decoder steps per hypothesis, its EOS included
    options: dict  # generation options, fairseq's names (min_len = max_len_b: every hypothesis runs `steps`)

    @property
    def key(self) -> str:
        """Its name in the results: "float32/b8/beam5"."""
        return f"{self.dtype}/b{self.batch}/beam{self.beam}"

    def in_dtype(self, dtype: str) -> Config:
        return replace(self, dtype=dtype)


def configurations(dtypes: list[str], batches: list[int], beams: list[int], steps: int, gen: dict) -> list[Config]:
    """Every dtype x batch x beam, each hypothesis held to `steps` tokens before its EOS."""
    return [Config(dtype, b, beam, steps + 1, {**gen, "beam": beam, "max_len_b": steps, "min_len": steps,
                                               "max_len_a": 0})
            for dtype in dtypes for b in batches for beam in beams]


def side_dtypes(side: str, dtypes: list[str]) -> list[str]:
    """The precisions a side is timed in: fairseq is the fp32 baseline of every one; int8 is the reference's and
    CTranslate2's; CTranslate2 on the CPU is timed in float32 and int8."""
    if side == "fairseq":
        return ["float32"]
    if side == "ctranslate2":
        return [d for d in dtypes if d in ("float32", "int8")]
    if side in ("transformers", "reference-unpacked", "reference-compiled"):
        return [d for d in dtypes if d != "int8"]
    return list(dtypes)


def side_configs(side: str, dtype: str, configs: list[Config]) -> list[Config]:
    """What a side times in one precision's process: fairseq, the fp32 baseline, each batch x beam once."""
    if side != "fairseq":
        return [c for c in configs if c.dtype == dtype]
    out: list[Config] = []
    for c in configs:
        if c.in_dtype("float32") not in out:
            out.append(c.in_dtype("float32"))
    return out
