"""Checkpoints saved in fp16 (as fairseq's --fp16 training saves them), one per family, converted and loaded
with no dtype: fairport computes in float32 as fairseq's hub does (it builds an fp32 model and loads the fp16
weights into it), so logits, generation and text equal the original's, run on the same fp16 file."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_fairseq, needs_shared
from fairport.converters.convert import convert
from fairport.reference import load
from fairport.validation import original
from fairport.validation.inputs import random_batch
from fairport.validation.verify import hub_request, original_overrides

FAMILIES = {"wmt_big_joined": None, "bart_base_mnli": None, "mbart_en_ro_spm": None,
            "m2m_multilingual": ("en", "de")}


def fp16_copy(fixtures_dir, name, out):
    """The fixture's release folder with its checkpoint's weights halved (a trusted file: plain torch.load)."""
    import shutil

    shutil.copytree(fixtures_dir / name, out)
    state = torch.load(out / "model.pt", weights_only=False)
    state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, out / "model.pt")
    return out


@needs_fairseq
@needs_shared
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp16_checkpoint_loads_with_defaults_and_equals_fairseq(name, fixtures_dir, tmp_path):
    from conftest import gpt2_files

    src = fp16_copy(fixtures_dir, name, tmp_path / "src")
    convert(src, tmp_path / "port", **gpt2_files(name))
    model = load(tmp_path / "port")  # no dtype
    assert next(model.parameters()).dtype == torch.float32
    cfg = model.config
    batch = random_batch(cfg.src_vocab_size, cfg.tgt_vocab_size, batch=4, seed=2)
    direction = FAMILIES[name]
    overrides = original_overrides(tmp_path / "port", *direction) if direction else None
    reqs = [{"kind": "logits"}, {"kind": "generate", "key": "g", "options": {"beam": 3, "max_len_b": 8}}]
    out = original.run([src / "model.pt"], src, batch, reqs, overrides=overrides)
    with torch.no_grad():
        logits = model(batch["src_tokens"], batch["prev_output_tokens"])
    keep = batch["prev_output_tokens"].ne(cfg.pad)
    assert (logits - out["logits"]).abs()[keep].max().item() <= 1e-4
    eos = model.generation_defaults().get("eos")  # the task's generator EOS (mBART translation: [ro_RO])
    prefix = None  # a many-to-many task's inference step forces the target language token first
    if direction:
        forced = model.tokenizer.framing.forced_prefix(direction[1])
        prefix = torch.full((batch["src_tokens"].size(0), 1), forced)
    mine = model.generate(batch["src_tokens"], beam=3, max_len_b=8, eos=eos, prefix_tokens=prefix)
    theirs = original.unpack_hypotheses(out, "g")
    assert [h[0]["tokens"].tolist() for h in mine] == [h[0]["tokens"].tolist() for h in theirs]
    if name == "bart_base_mnli":  # random GPT-2 ids do not all decode to text in fairseq: ids compared above
        return
    text = ["Hello world, this is a test.", "The cat sat on the mat."]
    lang = {"source_lang": direction[0], "target_lang": direction[1]} if direction else {}
    req = hub_request(tmp_path / "port", "interactive", text, "t", {"beam": 2, "max_len_b": 6})
    theirs_text = original.run([src / "model.pt"], src, {}, [req], overrides=overrides)["t"]
    assert model.translate(text, beam=2, max_len_b=6, **lang) == theirs_text
