"""The output folder: sharding, dtypes, provenance, generation config, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fairport.converters.convert import convert
from fairport.reference import load
from fairport.reference.folder import sha256
from fairport.validation.verify.inputs import random_batch
from helpers import HAVE_TRANSFORMERS, SHARED, gpt2_files, needs_fairseq, needs_shared, run


def logits(folder, seed=0):
    m = load(folder, dtype=torch.float32)
    b = random_batch(m.config.src_vocab_size, m.config.tgt_vocab_size, seed=seed)
    with torch.no_grad():
        return m(b["src_tokens"], b["prev_output_tokens"])


@needs_fairseq
def test_sharded_folder_loads_the_same(fixtures_dir, converted, tmp_path):
    dst = tmp_path / "sharded"
    convert(fixtures_dir / "wmt_big_joined", dst, max_shard_bytes=40_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (dst / "model.safetensors").exists()
    assert torch.equal(logits(dst), logits(converted("wmt_big_joined")))


@needs_fairseq
def test_tied_tensors_are_stored_once(converted):
    folder = converted("bart_base_mnli")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.shared.weight" in names
    assert not {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"} & names
    m = load(folder, pack=False)
    assert m.decoder.output_projection.weight is m.encoder.embed_tokens.weight
    packed = load(folder)  # the projection's oneDNN copy is made from that one tensor
    assert torch.equal(packed.decoder.output_projection.weight(), packed.encoder.embed_tokens.weight)


@needs_fairseq
@pytest.mark.parametrize("name,dtype,want", [("wmt_separate_cfg_fp16", "auto", torch.float16),
                                             ("wmt_big_joined", "bfloat16", torch.bfloat16),
                                             ("wmt_separate_cfg_fp16", "float32", torch.float32)])
def test_dtype_option(name, dtype, want, fixtures_dir, tmp_path):
    dst = tmp_path / "out"
    convert(fixtures_dir / name, dst, dtype=dtype)
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.encoder.embed_tokens.weight")
    assert t.dtype == want
    config = json.loads((dst / "config.json").read_text())
    assert config["fairport"]["stored_dtype"] == str(want).replace("torch.", "")
    assert config["dtype"] == "float32"  # what transformers' default load computes in: fairseq's numbers


@needs_fairseq
def test_provenance_records_source_and_files(fixtures_dir, converted):
    folder = converted("iwslt_legacy_2019")
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["source"]["sha256"] == sha256(fixtures_dir / "iwslt_legacy_2019" / "model.pt")
    for f, digest in prov["files"].items():
        assert sha256(folder / f) == digest, f
    assert any("version" in k for k in prov["dropped"]), prov["dropped"]
    assert prov["fairport_version"]


@needs_fairseq
def test_generation_config_has_fairseq_defaults_and_overrides(fixtures_dir, tmp_path):
    dst = tmp_path / "out"
    convert(fixtures_dir / "wmt_big_joined", dst, generation_overrides={"beam": 4, "lenpen": 0.6})
    gen = json.loads((dst / "generation_config.json").read_text())
    assert gen["fairseq"]["beam"] == 4 and gen["num_beams"] == 4
    assert gen["fairseq"]["lenpen"] == 0.6 and gen["length_penalty"] == 0.6
    assert gen["fairseq"]["max_len_b"] == 200 and gen["decoder_start_token_id"] == 2


@needs_fairseq
def test_layers_to_keep_and_version_markers(converted):
    c = load(converted("transformer_layers_to_keep")).config
    assert c.encoder_layers == 2 and c.decoder_layers == 1  # pruned as fairseq prunes at load
    c = load(converted("t2t_prenorm_old_decoder")).config
    assert c.encoder_final_norm and not c.decoder_final_norm  # decoder version <= 2: no final norm


@needs_fairseq
@needs_shared
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
def test_bart_tokenizer_from_folder_gives_fairseq_ids(converted, fixtures_dir):
    """transformers' BartTokenizer on the folder's vocab.json/merges.txt = fairseq's GPT-2 BPE + dict."""
    from fairseq.data import Dictionary as FairseqDictionary
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder
    from transformers import AutoTokenizer

    folder = converted("bart_base_mnli")
    tok = AutoTokenizer.from_pretrained(folder)
    files = gpt2_files("bart_base_mnli")
    bpe = get_encoder(str(files["encoder_json"]), str(files["vocab_bpe"]))
    d = FairseqDictionary.load(str(fixtures_dir / "bart_base_mnli" / "dict.txt"))
    d.add_symbol("<mask>")
    sentences = (SHARED / "text" / "en.txt").read_text().splitlines()[:300]
    for s in sentences:
        ids = " ".join(map(str, bpe.encode(s)))
        want = d.encode_line("<s> " + ids + " </s>", append_eos=False, add_if_not_exist=False).long().tolist()
        assert tok(s)["input_ids"] == want, s


@needs_fairseq
def test_converter_and_reference_work_without_fairseq(fixtures_dir, tmp_path):
    """fairseq is only for running the originals: with it made unimportable, convert + load + generate work."""
    import sys

    code = f"""
import sys
sys.modules['fairseq'] = None  # any 'import fairseq' now fails
sys.modules['omegaconf'] = None
from fairport.converters.convert import convert
from fairport.reference import load
convert({str(fixtures_dir / 'mbart_cfg')!r}, {str(tmp_path / 'out')!r})
m = load({str(tmp_path / 'out')!r})
import torch
print(len(m.generate(torch.tensor([[5, 6, 7, 2]]), beam=2, max_len_b=3)))
assert not any(k.startswith('fairseq') and sys.modules[k] is not None for k in sys.modules)
"""
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_streaming_safetensors_writer_round_trips(tmp_path):
    from safetensors.torch import load_file

    from fairport.reference.tensorfile import write_safetensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    tensors = {"a": base[:3], "b": base[3:].t(), "half": torch.randn(5, 3, generator=g).half(),
               "bf": torch.randn(7, generator=g).bfloat16(), "ids": torch.arange(5), "flag": torch.tensor(True),
               "empty": torch.zeros(0, 3)}
    want = {k: v.clone() for k, v in tensors.items()}
    dtypes = {k: v.dtype for k, v in tensors.items()} | {"a": torch.bfloat16}
    write_safetensors(tmp_path / "x.safetensors", tensors, dtypes, {"producer": "test"})
    assert tensors == {}  # consumed, so the writer holds one tensor at a time
    got = load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == dtypes[k] and torch.equal(got[k], v.to(dtypes[k])), k


@needs_fairseq
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_checkpoint_tensors_are_file_mappings(fixtures_dir):
    """Each tensor of a checkpoint, zip or legacy format, is a private memory map of the file (read on use,
    returned when dropped), and every tensor in it (model and training state) equals what torch.load reads."""
    from fairport.converters.checkpoint import load_checkpoint, restricted_pickle

    def tensors(obj, path=""):
        if isinstance(obj, torch.Tensor):
            yield path, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{path}/{i}")

    formats = set()
    for ckpt in sorted(fixtures_dir.glob("*/model.pt")):
        formats.add("zip" if ckpt.read_bytes()[:2] == b"PK" else "legacy")
        state = load_checkpoint(ckpt)
        spans = []
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and Path(fields[5]) == ckpt.resolve():
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
        want = dict(tensors(torch.load(ckpt, map_location="cpu", pickle_module=restricted_pickle,
                                       weights_only=False)))
        got = dict(tensors(state))
        assert set(got) == set(want) and any(k.startswith("/model/") for k in got), ckpt
        for k, t in got.items():
            assert t.dtype == want[k].dtype and torch.equal(t, want[k]), (ckpt, k)
            if t.numel():
                assert any(lo <= t.data_ptr() < hi for lo, hi in spans), f"{ckpt} {k} is not mapped from the file"
    assert formats == {"zip", "legacy"}
