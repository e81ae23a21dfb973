"""What the tests share: paths, which originals are installed, a CLI runner, assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRPORT_SHARED_DATA", ROOT.parent / "shared" / "data"))
HAVE_FAIRSEQ = importlib.util.find_spec("fairseq") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# tests that run fairseq (the original); conftest skips them where it is not installed, and
# `pytest -m "not fairseq"` leaves them out
needs_fairseq = pytest.mark.fairseq
needs_shared = pytest.mark.skipif(not (SHARED / "gpt2" / "encoder.json").exists(),
                                  reason=f"shared data not found at {SHARED}")
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
needs_ctranslate2 = pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None,
                                       reason="CTranslate2 not installed: pip install 'fairport[ctranslate2]'")


def gpt2_files(name: str) -> dict:
    """The GPT-2 BPE files a fixture with a GPT-2 dictionary converts with (when the shared data is here)."""
    from fairport.validation.original.fixtures import FIXTURES

    if FIXTURES.get(name, {}).get("dicts") == "gpt2" and (SHARED / "gpt2" / "encoder.json").exists():
        return {"encoder_json": SHARED / "gpt2" / "encoder.json", "vocab_bpe": SHARED / "gpt2" / "vocab.bpe"}
    return {}


# no test's process may run longer: a hang fails its test (the run's output so far in the message) instead of
# holding the suite until CI gives up
PROCESS_TIMEOUT = float(os.environ.get("FAIRPORT_TEST_PROCESS_TIMEOUT", 900))


def run(cmd: list, *, env: dict | None = None, stdin: str | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run `cmd` (text in, text out captured) in its own process group; past PROCESS_TIMEOUT the whole group
    (torchrun's workers and their fairseq workers too) is killed and the test fails with what it printed."""
    proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:6]))} ... ran past {PROCESS_TIMEOUT:.0f}s and was killed\n"
                    f"{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args, env: dict | None = None, stdin: str | None = None, fresh: bool = False
            ) -> subprocess.CompletedProcess:
    """`python -m fairport ARGS` in a process of its own, as a user runs it: forked from one that has imported
    the command line and torch (cliserver.py; ~1.3 s less a run), or a fresh interpreter when `fresh` or when
    `env` changes a setting read while importing (FORK_UNSAFE)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if not fresh:
        # verify: the server that has imported transformers too where the session started one (conftest, when
        # test_verify's tests run; elsewhere verify's few runs stop early, before those imports), unless this run
        # changes a setting it read then
        hub = str(args[0]) == "verify" and True in CliServer._servers
        server = CliServer.get(hub=hub and not _differs(env, CliServer.session_env(), HUB_SETTINGS))
        if not _differs(env, server.env, FORK_UNSAFE):
            return server.run([str(a) for a in args], env, stdin)
    return run([sys.executable, "-m", "fairport", *args], stdin=stdin, env=env)


# settings read while torch or the interpreter start: a run whose environment changes one gets a fresh interpreter
FORK_UNSAFE = ("PYTHON", "OMP_", "GOMP_", "KMP_", "MKL_", "LD_", "MALLOC", "THP_")
# read while transformers and the Hub's client import (cliserver.HUB_MODULES)
HUB_SETTINGS = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")


def _differs(env: dict, other: dict, prefixes: tuple[str, ...]) -> bool:
    return any(env.get(k) != other.get(k) for k in {*env, *other} if k.startswith(prefixes))


class CliServer:
    """The client of cliserver.py (at most two per test session, the plain one and the one for verify that
    imported the hub's libraries too; each started at its first use, ended with the session)."""
    _servers: dict[bool, CliServer] = {}

    @classmethod
    def get(cls, hub: bool = False) -> CliServer:
        """The server, started again when the session's own environment changed a setting read while importing
        since it started (sklearn and joblib when imported, and inductor's C++ builder, set KMP_* in this
        process: every command after that was a fresh interpreter, ~2x the time of a forked verify)."""
        server = cls._servers.get(hub)
        if server is not None and _differs(cls.session_env(), server.env, FORK_UNSAFE + HUB_SETTINGS):
            server.close()
            server = None
        if server is None or server.proc.poll() is not None:
            server = cls._servers[hub] = cls(hub)
        return server

    @staticmethod
    def session_env() -> dict:
        return {**os.environ, "PYTHONWARNINGS": "ignore"}

    def __init__(self, hub: bool):
        import tempfile

        self.env = self.session_env()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cliserver.py")),
                                      *(["--hub"] if hub else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=self.env)
        self.tmp = Path(tempfile.mkdtemp(prefix="fairport-cli-"))
        self.replies = b""

    def reply(self, timeout: float | None = None) -> int | None:
        """The server's next line (a pid or an exit status); None when `timeout` seconds pass without one."""
        import select

        while b"\n" not in self.replies:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 64)
            if not chunk:
                raise RuntimeError("tests/cliserver.py ended unexpectedly")
            self.replies += chunk
        line, self.replies = self.replies.split(b"\n", 1)
        return int(line)

    def close(self) -> None:
        """End the server (it ends when its stdin closes) and remove its files."""
        import shutil

        self.proc.stdin.close()
        self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, args: list[str], env: dict, stdin: str | None) -> subprocess.CompletedProcess:
        files = {name: self.tmp / name for name in ("stdin", "stdout", "stderr")}
        if stdin is not None:
            files["stdin"].write_text(stdin)
        request = {"args": args, "env": env, "cwd": str(ROOT), "stdin": str(files["stdin"]) if stdin is not None
                   else None, "stdout": str(files["stdout"]), "stderr": str(files["stderr"])}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        pid = self.reply()
        code = self.reply(PROCESS_TIMEOUT)
        if code is None:
            os.killpg(pid, signal.SIGKILL)
            self.reply()
        out, err = files["stdout"].read_text(), files["stderr"].read_text()
        if code is None:
            pytest.fail(f"fairport {' '.join(args[:5])} ... ran past {PROCESS_TIMEOUT:.0f}s and was killed\n"
                        f"{out[-3000:]}\n{err[-3000:]}")
        return subprocess.CompletedProcess([sys.executable, "-m", "fairport", *args], code, out, err)


def torchrun(*args, env: dict | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC ARGS` (one thread per process unless `env` says)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nproc, *args],
               env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """A non-zero exit with exactly one line on stderr, `fairport: error: ...`, naming `words`; no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fairport: error:"), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    """Within `atol` everywhere; the failure message gives the largest and mean differences."""
    d = (actual.float() - expected.float()).abs()
    assert d.max().item() <= atol, f"{what}: max |Δ| {d.max().item():.3g} (mean {d.mean().item():.3g}) > {atol}"


def rewrite_weights(folder: Path, change) -> None:
    """Change a converted folder's weights on purpose (`change(dict of tensors)` edits them in place), as a port
    that converted them so would hold them: model.safetensors rewritten and its sha256 in provenance.json
    updated (load() refuses weights that differ from what provenance.json recorded)."""
    import json

    from safetensors.torch import load_file, save_file

    from fairport.reference.folder import sha256

    path = Path(folder) / "model.safetensors"
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path), metadata={"format": "pt"})
    prov = json.loads((Path(folder) / "provenance.json").read_text())
    prov["files"]["model.safetensors"] = sha256(path)
    (Path(folder) / "provenance.json").write_text(json.dumps(prov, indent=2))


TINY = dict(src_vocab_size=40, tgt_vocab_size=40, encoder_embed_dim=16, encoder_ffn_dim=32, encoder_layers=1,
            encoder_heads=2, decoder_embed_dim=16, decoder_input_embed_dim=16, decoder_output_dim=16,
            decoder_ffn_dim=32, decoder_layers=1, decoder_heads=2, max_source_positions=64, max_target_positions=64,
            share_all_embeddings=True, share_decoder_input_output_embed=True)


def tiny_checkpoint(folder: Path, **config) -> Path:
    """A small checkpoint in fairseq's format (legacy `args` and a state dict under fairseq's names, as the
    2019-2020 releases were saved) with its dictionaries, written without fairseq: random weights of the
    `transformer` arch with ModelConfig TINY (`config` changes it; the options fairseq would have saved for it),
    a whitespace vocabulary. For tests of the command line and of the reference's own paths, not of parity."""
    import argparse

    from fairport.converters.convert import expected_shapes
    from fairport.reference.config import ModelConfig

    cfg = ModelConfig(**{**TINY, **config})
    folder.mkdir(parents=True, exist_ok=True)
    for side, size in (("src", cfg.src_vocab_size), ("tgt", cfg.tgt_vocab_size)):  # + 4 specials
        (folder / f"dict.{side}.txt").write_text("".join(f"w{i} 1\n" for i in range(size - 4)))
    args = argparse.Namespace(
        arch="transformer", task="translation", source_lang="src", target_lang="tgt",
        encoder_embed_dim=cfg.encoder_embed_dim, encoder_ffn_embed_dim=cfg.encoder_ffn_dim,
        encoder_layers=cfg.encoder_layers, encoder_attention_heads=cfg.encoder_heads,
        encoder_normalize_before=cfg.encoder_normalize_before, encoder_learned_pos=cfg.encoder_learned_pos,
        decoder_embed_dim=cfg.decoder_embed_dim, decoder_ffn_embed_dim=cfg.decoder_ffn_dim,
        decoder_layers=cfg.decoder_layers, decoder_attention_heads=cfg.decoder_heads,
        decoder_output_dim=cfg.decoder_output_dim, decoder_normalize_before=cfg.decoder_normalize_before,
        no_decoder_final_norm=not cfg.decoder_final_norm, decoder_learned_pos=cfg.decoder_learned_pos,
        no_token_positional_embeddings=not cfg.positional_embeddings,
        layernorm_embedding=cfg.layernorm_embedding, no_scale_embedding=not cfg.scale_embedding,
        activation_fn=cfg.activation_fn, share_all_embeddings=cfg.share_all_embeddings,
        share_decoder_input_output_embed=cfg.share_decoder_input_output_embed,
        max_source_positions=cfg.max_source_positions, max_target_positions=cfg.max_target_positions)
    g = torch.Generator().manual_seed(0)
    model = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in expected_shapes(cfg).items()}
    model["encoder.version"] = model["decoder.version"] = torch.tensor([3.0])
    torch.save({"args": args, "model": model, "optimizer_history": [], "extra_state": {}}, folder / "model.pt")
    return folder / "model.pt"


def tiny_release_and_port(root: Path) -> Path:
    """`root/release` (tiny_checkpoint) and `root/port`, its folder converted by the command line; returns root."""
    proc = run_cli("convert", tiny_checkpoint(root / "release"), root / "port")
    assert proc.returncode == 0, proc.stderr
    return root


class FakeOriginal:
    """The original's protocol answered by fairport's reference model loaded from `folder`: the same typed
    requests and results as fairseq's worker (validation/original/protocol.py), without fairseq. verify's checks
    run against it in fairseq-free tests: a folder whose weights were changed after the fake loaded them is a
    port that differs from its original."""

    def __init__(self, folder: Path):
        from fairport.reference import load

        self.model = load(folder, dtype=torch.float32)
        self.requests: list[str] = []

    def __call__(self, request):
        import time

        from fairport.reference.generate import generate
        from fairport.util import peak_rss_mb
        from fairport.validation.original import protocol as p
        from fairport.validation.verify.checks.layers import layer_outputs

        self.requests.append(type(request).__name__)
        if isinstance(request, p.Logits):  # Layers too
            with torch.no_grad(), layer_outputs(self.model) as layers:
                logits = self.model(request.src, request.prev)
            return p.Forward(logits, dict(layers) if isinstance(request, p.Layers) else None)
        if isinstance(request, p.Generate):
            assert not request.force_bos, "FakeOriginal: BART's hub framing is not modelled"
            trace = [] if request.trace else None
            t0 = time.perf_counter()
            hyps = generate(self.model, request.src, prefix_tokens=request.prefix, trace=trace, **request.options)
            return p.Generated(hyps, time.perf_counter() - t0, trace)
        if isinstance(request, p.Memory):
            return peak_rss_mb()
        raise NotImplementedError(f"FakeOriginal answers no {type(request).__name__} request")

    def close(self) -> None:
        pass
