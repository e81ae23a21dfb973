"""int8 stored in the folder (`convert --int8`): the int8 model load(dtype="int8") would make by quantizing the float
weights, written once and read back instead, with the same values; a damaged or missing int8 file is named in one
line. fairseq-free: small checkpoints in fairseq's format written without fairseq (helpers.tiny_checkpoint); how
int8 compares with the original is verify's int8 row (test_verify.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fairport.errors import FairportError
from fairport.reference import fast, load
from fairport.reference.folder import INT8
from helpers import assert_one_error_line, run_cli, tiny_checkpoint

pytestmark = pytest.mark.skipif(not fast.int8_available(), reason="this torch has no quantized dynamic linear")

# every way a token embedding and the output projection can be shared, with the layers' other options
CONFIGS = {
    "shared_all": {},
    "separate": dict(share_all_embeddings=False, share_decoder_input_output_embed=False, src_vocab_size=44,
                     encoder_learned_pos=True, decoder_learned_pos=True, layernorm_embedding=True),
    "decoder_tied": dict(share_all_embeddings=False, decoder_normalize_before=True, decoder_final_norm=True,
                         decoder_output_dim=12, decoder_input_embed_dim=12),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"int8-{request.param}")
    ckpt = tiny_checkpoint(root / "release", **CONFIGS[request.param])
    proc = run_cli("convert", ckpt, root / "port", "--int8")
    assert proc.returncode == 0, proc.stderr
    assert "model.int8.safetensors" in proc.stdout
    return root / "port"


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    src = torch.randint(4, cfg.src_vocab_size, (3, 9), generator=g)
    prev = torch.randint(4, cfg.tgt_vocab_size, (3, 6), generator=g)
    with torch.no_grad():
        logits = model(src, prev)
    return logits, [[h["tokens"].tolist() for h in hyps] for hyps in model.generate(src, beam=3, max_len_b=6)]


def test_stored_int8_is_the_int8_model_load_would_make(converted, tmp_path):
    """The folder lists the int8 file in provenance; loading it gives exactly the logits and tokens of quantizing
    the float weights at load (the same folder without the file), and holds only int8 matrices and tables."""
    assert INT8 in json.loads((converted / "provenance.json").read_text())["files"]
    stored = load(converted, dtype="int8")
    assert fast.quantized(stored)
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in stored.modules())
    plain = tmp_path / "plain"
    shutil.copytree(converted, plain)
    (plain / INT8).unlink()
    prov = json.loads((plain / "provenance.json").read_text())
    del prov["files"][INT8]
    (plain / "provenance.json").write_text(json.dumps(prov))
    quantized_at_load = load(plain, dtype="int8")
    (a, tokens_a), (b, tokens_b) = outputs(stored), outputs(quantized_at_load)
    assert torch.equal(a, b) and tokens_a == tokens_b
    fp32_logits, _ = outputs(load(converted))
    assert not torch.equal(a, fp32_logits)  # int8 (not the float model) ...
    assert (a - fp32_logits).abs().max() <= 0.1 * fp32_logits.abs().max()  # ... within verify's int8 tolerance


def test_a_damaged_int8_file_is_named_in_one_line(converted, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(converted, folder)
    data = bytearray((folder / INT8).read_bytes())
    data[-5] ^= 0xFF
    (folder / INT8).write_bytes(bytes(data))
    with pytest.raises(FairportError, match="model.int8.safetensors does not match the sha256"):
        load(folder, dtype="int8")
    assert outputs(load(folder))[0].shape[0] == 3  # float32 runs do not read it
    src = tmp_path / "in.txt"
    src.write_text("w4 w5 w6\n")
    assert_one_error_line(run_cli("generate", folder, "--input", src, "--dtype", "int8"),
                          "model.int8.safetensors", "damaged")
    (folder / INT8).unlink()
    with pytest.raises(FairportError, match="model.int8.safetensors is missing"):
        load(folder, dtype="int8")
