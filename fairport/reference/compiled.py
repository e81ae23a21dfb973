"""A compiled decoder step for generation, beside the eager reference (which stays the reference).

At small model sizes a decoder step is ~50 small operations whose fixed costs (Python, torch's dispatcher, a
kernel call each) are most of its time. `compile_step(model)` exports the step (`torch.export`) and compiles it
ahead of time with AOTInductor: inductor generates C++ for the whole step (weights frozen as constants, its own
GEMM micro-kernels where its search finds them faster), builds it, and each step is then one call into that
code, with no Python per operation and no guard checks (torch.compile's per-call checks measured ~100 us a step
here, the whole step of a tiny model). Generation uses it for every model that has one (`model.compiled_step`):
`load(..., compile=True)` and the CLI's `--compile` attach it, `model.compiled_step = None` takes it off.

The step runs the reference decoder's own code: its embedding of a step (`Decoder.embed`), each layer's residual
blocks, norms, projections and feed-forward (`residual_block`, the layer's modules) and its head (`Decoder.head`,
then the output projection); its state implements the eager state's interface (`generate.StepState`). Two things
differ from the eager step. Attention (the same `Attention.attend`) runs its written-out kernel, products
and sums that the compiler fuses into loops (torch's fused attention kernel is an opaque call costing more than
the whole product at small sizes). And every layer's self-attention cache lives in one buffer (capacity, layers,
2, rows, heads, head width) sized once for the generation's max length: the step reads the earlier steps'
slots, attends over them and its own keys and values, and returns those; the caller writes them into the
buffer. Nothing is
changed in place inside the compiled code (an input written in place there was copied whole at every layer).
Rows, source length and step count are dynamic sizes of the compiled program: sentences leaving the batch need
nothing new, and a beam reorder is one gather for all layers. Its logits differ from the eager step's by ~1e-6
(other summation orders); the tests check its tokens against the eager reference and against fairseq.

Compiled once per machine: the compiled program is kept on disk (`cache_dir()`: $FAIRPORT_CACHE, else
~/.cache/fairport/compiled), keyed by what it depends on (`cache_key`: the folder's weight hashes, torch and
fairport versions, the processor, device, dtype and thread count, the compiler options); a later process, or
another rank on the machine, loads it instead of compiling (a lock makes concurrent processes compile once).

Threads: inductor fixes the number of threads of its generated loops when it compiles (torch's count then), so
set torch.set_num_threads before loading with compile=True; a later change does not reach the compiled step.

Not measured: CUDA. The same code exports and compiles for a CUDA device (inductor generates Triton kernels
there), but no GPU was available to run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from fairport.errors import FairportError
from fairport.reference.model import Decoder, EncoderDecoder, SinusoidalPositions, gather_rows, residual_block

# inductor's options on the CPU: weights become constants (`freezing`: inductor packs them for its GEMMs), and
# the max-autotune search times inductor's C++ GEMM micro-kernels against the library (oneDNN) product for each
# matrix, at the example's 40 rows: on `tiny` the micro-kernels win (a batch-1 greedy step 0.18 ms with the
# search, 0.22 without), at wmt19-en-de size the library (timed at 6 rows instead, the search picked
# micro-kernels that made batch 8 x beam 5 1.7x slower than the eager step)
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def position_row(positions: nn.Module, index: torch.Tensor) -> torch.Tensor:
    """The positional embedding at a 0-d index tensor, as a (1, C) row (a graph input, not a Python int: one
    compiled graph for every step)."""
    table = positions.table if isinstance(positions, SinusoidalPositions) else positions.weight
    return table.index_select(0, index.view(1))


def self_attention(x: torch.Tensor, attn, kv: torch.Tensor, new_rows: list[torch.Tensor]) -> torch.Tensor:
    """The newest token's self-attention (the decoder's own `Attention.attend`, written-out kernel) over the earlier
    steps' keys and values kv[:-1] (t, 2, B, H, D, time-major as the cache stores them; the last slot, this step's,
    is not written yet) and its own; its own keys and values (2, B, H, D) go to `new_rows` (the caller writes them
    into the cache: no input is changed in place, so the compiled code copies nothing). x (B, 1, C)."""
    q, new = attn.project_qkv(x)  # new: (B, 1, 2, H, D)
    own = new[:, 0].permute(1, 0, 2, 3)  # (2, B, H, D)
    kv_all = torch.cat([kv[:-1], own.unsqueeze(0)])  # (t + 1, 2, B, H, D)
    new_rows.append(own)
    k, v = kv_all[:, 0].permute(1, 2, 0, 3), kv_all[:, 1].permute(1, 2, 0, 3)  # (B, H, t + 1, D) views
    return attn.attend(q, k, v, None, fused=False)


def cross_attention(x: torch.Tensor, attn, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The newest token's attention over the source (the decoder's own `Attention.attend`, written-out kernel):
    k, v (Bs, H, S, D) computed once per sentence, each row serving its sentence's B / Bs beams; mask additive
    (Bs, 1, 1, S). x (B, 1, C)."""
    return attn.attend(attn.q_proj(x), k, v, mask, fused=False)


class DecoderStep(nn.Module):
    """Decoder.features + output projection + log-softmax for one new token per row (what DecoderState.step
    computes eagerly), with the caches as inputs: what is exported and compiled."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, kv: torch.Tensor, cross: torch.Tensor,
                enc_mask: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, 1); position 0-d (the 0-based step t); kv (t + 1, L, 2, B, H, D), every layer's
        self-attention cache up to this step's slot (read only: its last slot is not used); cross
        (L, 2, Bs, H, S, D), every layer's cross-attention keys and values; enc_mask (Bs, 1, 1, S) additive;
        temperature 0-d -> log-probabilities (B, V) in fp32, and this step's keys and values (L, 2, B, H, D)
        for the cache's slot t."""
        dec = self.decoder
        positions = None  # fairseq: step t's position is pad + 1 + t
        if dec.embed_positions is not None:
            positions = position_row(dec.embed_positions, position + dec.pad + 1)
        x = dec.embed(tokens, positions)
        new_rows: list[torch.Tensor] = []
        for i, layer in enumerate(dec.layers):
            x = residual_block(x, layer.self_attn_layer_norm, layer.pre_norm, self_attention, layer.self_attn,
                               kv[:, i], new_rows)
            x = residual_block(x, layer.encoder_attn_layer_norm, layer.pre_norm, cross_attention, layer.encoder_attn,
                               cross[i, 0], cross[i, 1], enc_mask)
            x = residual_block(x, layer.final_layer_norm, layer.pre_norm, layer.ffn)
        logits = dec.output_projection(dec.head(x))[:, -1, :]
        return torch.log_softmax(logits.div(temperature).float(), dim=-1), torch.stack(new_rows)


class CompiledStep:
    """A model's decoder step compiled ahead of time by AOTInductor (`torch.export`, then C++ generated and built
    by inductor), for any number of rows, source length and steps: one C++ call per step, no Python per
    operation and no guard checks (torch.compile's per-call checks cost ~100 us a step here). The weights are
    copied into the compiled program (frozen constants): change the model's weights and compile again."""

    def __init__(self, model: EncoderDecoder, options: dict | None = None):
        self.model = model
        p = next(model.parameters())
        # example inputs, also the sizes inductor's GEMM search times its candidates at: 8 sentences x 5 beams (a
        # batch of beam search), 12 source tokens, the 4th step
        sentences, beam = 8, 5
        with torch.no_grad():
            src = torch.full((sentences, 12), model.config.eos + 1, device=p.device)
            example = CompiledDecoderState(model, None, src, rows=sentences * beam, capacity=7)
        args = (torch.full((sentences * beam, 1), model.config.eos, device=p.device), example.positions[3],
                example.kv[:4],
                example.cross, example.enc_mask, torch.tensor(1.0, device=p.device))
        rows, steps = Dim("rows", min=1), Dim("steps", min=1)
        sentences, source_length = Dim("sentences", min=1), Dim("source_length", min=1)
        dynamic = ({0: rows}, None, {0: steps, 3: rows}, {2: sentences, 4: source_length},
                   {0: sentences, 3: source_length}, None)
        if options is None:
            options = CPU_OPTIONS if p.device.type == "cpu" else {}
        key = cache_key(model, options)
        self.cached = None if key is None else cache_dir() / f"{key}.pt2"
        self.from_cache = False
        try:  # inductor prints its GEMM search's timings on stderr: silenced
            with _locked(self.cached), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation notices from inside the compiler
                self.run = _load_cached(self.cached)
                self.from_cache = self.run is not None
                if self.run is None:
                    # sizes of 0 or 1 (the first steps, one row) take the general code path, not guards against them
                    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
                        program = torch.export.export(DecoderStep(model.decoder).eval(), args, dynamic_shapes=dynamic)
                    self.run = _compile(program, options, self.cached)
        except Exception as e:  # noqa: BLE001 - any compiler failure: one line, the eager step still works
            detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            raise FairportError(f"compiling the decoder step failed ({type(e).__name__}: {detail}); generate without "
                                f"--compile / compile=True (the eager step gives the same tokens)") from e

    def state(self, src_tokens: torch.Tensor, rows: int, capacity: int) -> CompiledDecoderState:
        return CompiledDecoderState(self.model, self.run, src_tokens, rows, capacity)


def cache_dir() -> Path:
    return Path(os.environ.get("FAIRPORT_CACHE") or Path.home() / ".cache" / "fairport") / "compiled"


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line  # the model name, else the instruction sets: what inductor's generated code assumes
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_code() -> str:
    """The sha256 of the source the step is traced from (this module and the model's): a changed step compiles
    again even within one fairport version."""
    from fairport.reference import model as model_module

    digest = hashlib.sha256()
    for path in (Path(model_module.__file__), Path(__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(model: EncoderDecoder, options: dict) -> str | None:
    """What a compiled step depends on, hashed: the weights (the folder's recorded hashes, so a folder that
    changed compiles again), the versions and the step's source code, the processor, device, dtype and thread
    count (inductor fixes its loops' threads when it compiles), the compiler options. None (no caching) for a
    model not loaded from a folder with recorded hashes."""
    from fairport import __version__

    folder = getattr(model, "folder", None)
    files = (folder.provenance.get("files") if folder is not None else None) or None
    if not files:
        return None
    p = next(model.parameters())
    parts = {"weights": files, "torch": torch.__version__, "fairport": __version__, "code": step_code(),
             "cpu": _processor(),
             "device": str(p.device), "dtype": str(p.dtype), "threads": torch.get_num_threads(),
             "options": options, "config": model.config.to_dict()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path | None):
    """One process at a time compiles a given step; the others wait, then load what it kept."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (two processes may both compile; each keeps a whole file)
        yield
        return
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_cached(path: Path | None):
    if path is None or not path.is_file():
        return None
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception:  # noqa: BLE001 - a damaged or foreign cache entry: compile again (it is replaced)
        return None


def _compile(program, options: dict, keep: Path | None):
    """Compile with AOTInductor; the package is kept at `keep` (written beside it, then renamed into place)."""
    with tempfile.TemporaryDirectory(prefix="fairport-step-") as tmp:
        # a copy: inductor adds its packaging flag to the dict it is given, which changed the options (and so the
        # cache key) of every later compile_step in the process
        path = torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/step.pt2",
                                                        inductor_configs=dict(options))
        if keep is None:
            return torch._inductor.aoti_load_package(path)
        part = keep.with_suffix(f".{os.getpid()}.part")
        shutil.move(path, part)
        os.replace(part, keep)  # a whole file, or none
    return torch._inductor.aoti_load_package(str(keep))


def compile_step(model: nn.Module, options: dict | None = None) -> nn.Module:
    """Attach a compiled decoder step to the model (to each member of an ensemble); generation uses it. The
    model must hold plain layers (load(..., compile=True) or pack=False): oneDNN-packed and int8 layers call
    kernels the compiler cannot trace. Takes ~30 s on a tiny model, 1-2 min on large ones (inductor generates
    and builds C++). `options`: inductor's (default CPU_OPTIONS on the CPU). Returns the model."""
    from fairport.reference import fast

    members = list(getattr(model, "members", None) or [model])
    for m in members:
        if fast.packed(m) or fast.quantized(m):
            raise FairportError("the compiled step needs plain layers: load the folder with compile=True (or "
                                "pack=False), not int8")
        m.compiled_step = CompiledStep(m, options)
    return model


class CompiledDecoderState:
    """One model's generation state for the compiled step `run` (generate.StepState: step, reorder,
    keep_sentences). Every layer's self-attention keys and values live in one buffer
    (capacity, layers, 2, rows, H, D) for `capacity` steps (the generation's max length + 1, which the generator
    keeps within the model's target positions); a beam reorder is one gather for all layers."""

    def __init__(self, model: EncoderDecoder, run, src_tokens: torch.Tensor, rows: int, capacity: int):
        self.run = run
        dec = model.decoder
        enc = model.encoder(src_tokens)
        # zeros where nothing is padded (adding zeros changes no score): every call has the same inputs
        mask = enc.attn_mask if enc.attn_mask is not None else torch.zeros(
            (src_tokens.size(0), 1, 1, src_tokens.size(1)), dtype=enc.x.dtype, device=enc.x.device)
        self.enc_mask = mask.contiguous()  # the compiled code assumes the example inputs' contiguous strides
        attns = [layer.encoder_attn for layer in dec.layers]
        self.cross = torch.stack([torch.stack(a.keys_values(enc.x)) for a in attns])
        attn = dec.layers[0].self_attn
        self.kv = enc.x.new_empty((capacity, len(dec.layers), 2, rows, attn.heads, attn.head_dim))
        self.spare: torch.Tensor | None = None
        self.positions = torch.arange(capacity, device=enc.x.device)
        self.temperatures: dict[float, torch.Tensor] = {}
        self.len = 0  # steps taken: the buffer's slots in use

    def step(self, tokens: torch.Tensor, step: int, temperature: float) -> torch.Tensor:
        t = self.temperatures.get(temperature)
        if t is None:  # logits / 1.0 is exact: dividing always keeps one kind of call
            t = self.temperatures[temperature] = torch.tensor(temperature, device=tokens.device)
        # the loop's tokens are a column view: made contiguous, as the compiled code assumes
        lprobs, new = self.run(tokens.contiguous(), self.positions[step], self.kv[: step + 1], self.cross,
                               self.enc_mask, t)
        self.kv[step] = new
        self.len = step + 1
        return lprobs

    def keep_sentences(self, sentence_idx: torch.Tensor) -> None:
        """Finished sentences leave the batch: keep the others' cross-attention keys/values and mask."""
        self.cross = self.cross.index_select(2, sentence_idx)
        self.enc_mask = self.enc_mask.index_select(0, sentence_idx)

    def reorder(self, order: torch.Tensor) -> None:
        """Keep the cache rows in `order`: one gather of the slots in use, for all layers."""
        self.kv, self.spare = gather_rows(self.kv, self.spare, self.len, 3, order)
