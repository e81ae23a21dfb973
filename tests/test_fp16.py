"""Checkpoints saved in fp16 (as fairseq's --fp16 training saves them), one per family, converted and loaded
with no dtype: fairport computes in float32 as fairseq's hub does (it builds an fp32 model and loads the fp16
weights into it), so logits, generation and text equal the original's, run on the same fp16 file."""

from __future__ import annotations

import pytest
import torch

from fairport.converters.convert import convert
from fairport.reference import load
from fairport.validation.original.protocol import Generate, Logits, direction_overrides, hub_request, run
from fairport.validation.verify.inputs import random_batch
from helpers import HAVE_TRANSFORMERS, needs_fairseq, needs_shared

FAMILIES = {"wmt_big_joined": None, "bart_base_mnli": None, "mbart_en_ro_spm": None,
            "m2m_multilingual": ("en", "de")}


def fp16_copy(fixtures_dir, name, out, dtype=torch.float16):
    """The fixture's release folder with its checkpoint's weights halved (a trusted file: plain torch.load)."""
    import shutil

    shutil.copytree(fixtures_dir / name, out)
    state = torch.load(out / "model.pt", weights_only=False)
    state["model"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, out / "model.pt")
    return out


@needs_fairseq
@needs_shared
@pytest.mark.parametrize("name,half", [(name, torch.float16) for name in FAMILIES] +
                         [("wmt_big_joined", torch.bfloat16), ("bart_base_mnli", torch.bfloat16)])
def test_fp16_checkpoint_loads_with_defaults_and_equals_fairseq(name, half, fixtures_dir, tmp_path):
    """fairport's load() and, where the folder is transformers-loadable, transformers' own defaults
    (`AutoModelForSeq2SeqLM.from_pretrained(folder)`, nothing else: what the card's usage line runs) compute as
    fairseq does on the same half-precision file; the folder stores the weights as the checkpoint did."""
    from helpers import gpt2_files

    src = fp16_copy(fixtures_dir, name, tmp_path / "src", half)
    convert(src, tmp_path / "port", **gpt2_files(name))
    model = load(tmp_path / "port")  # no dtype
    assert next(model.parameters()).dtype == torch.float32
    cfg = model.config
    batch = random_batch(cfg.src_vocab_size, cfg.tgt_vocab_size, batch=4, seed=2)
    direction = FAMILIES[name]
    overrides = direction_overrides(tmp_path / "port", *direction) if direction else None
    with torch.no_grad():
        logits = model(batch["src_tokens"], batch["prev_output_tokens"])
    keep = batch["prev_output_tokens"].ne(cfg.pad)
    prefix = None  # a many-to-many task's inference step forces the target language token first
    if direction:
        forced = model.tokenizer.framing.forced_prefix(direction[1])
        prefix = torch.full((batch["src_tokens"].size(0), 1), forced)
    theirs_logits, out = run([src / "model.pt"], src, Logits(batch["src_tokens"], batch["prev_output_tokens"]),
                             Generate(batch["src_tokens"], {"beam": 3, "max_len_b": 8}), overrides=overrides)
    assert (logits - theirs_logits.logits).abs()[keep].max().item() <= 1e-4
    assert model.folder.dtype == str(half).replace("torch.", "")  # stored as the checkpoint had it
    if model.folder.transformers and HAVE_TRANSFORMERS:
        from fairport.validation.verify.transformers_side import TransformersSide

        hf = TransformersSide(model.folder, "cpu")  # from_pretrained(folder), transformers' defaults
        assert next(hf.model.parameters()).dtype == torch.float32
        theirs_hf = hf.logits(batch["src_tokens"], batch["prev_output_tokens"])
        assert (theirs_hf - theirs_logits.logits).abs()[keep].max().item() <= 1e-4
    eos = model.generation_defaults().get("eos")  # the task's generator EOS (mBART translation: [ro_RO])
    mine = model.generate(batch["src_tokens"], beam=3, max_len_b=8, eos=eos, prefix_tokens=prefix)
    theirs = out.hypotheses
    assert [h[0]["tokens"].tolist() for h in mine] == [h[0]["tokens"].tolist() for h in theirs]
    if name == "bart_base_mnli":  # random GPT-2 ids do not all decode to text in fairseq: ids compared above
        return
    text = ["Hello world, this is a test.", "The cat sat on the mat."]
    lang = {"source_lang": direction[0], "target_lang": direction[1]} if direction else {}
    req = hub_request(tmp_path / "port", "interactive", text, {"beam": 2, "max_len_b": 6})
    [theirs_text] = run([src / "model.pt"], src, req, overrides=overrides)
    assert model.translate(text, beam=2, max_len_b=6, **lang) == theirs_text
