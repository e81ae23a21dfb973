"""The folder's tokenizer, and transformers' AutoTokenizer on the folder, against fairseq's own encoder on the
same sentences."""

from __future__ import annotations

from fairport.validation.original.protocol import hub_request

NAME = "tokenizer"
SENTENCES = 200  # the first sentences of text inputs that are encoded on both sides
FSMT_RULE = ("FSMTTokenizer normalises punctuation (Moses) before tokenizing; fairseq's pipeline does not: pass "
             "fairseq's text through fairport's tokenizer for fairseq's ids")


def report(run) -> None:
    s = run.setup
    if s.tokenizer is None or not s.inputs.src_text:
        return
    sentences = s.inputs.src_text[:SENTENCES]
    req = hub_request(s.folder, "encode", sentences, files=s.opts.text_files)
    if req is None:
        run.report.note("tokenizer check skipped: the original's BPE files were not found (pass them with the "
                        "flags convert takes, e.g. --bpecodes)")
        return
    theirs = run.fairseq()(req)
    ours = [encode(s, text) for text in sentences]
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    run.report.sections[NAME] = {"sentences": len(ours), "mismatches": bad[:50]}
    run.report.add("tokenizer: ids equal the original's encoder", not bad, len(bad), 0,
                   f"{len(bad)} of {len(ours)} sentences differ")
    if s.hf is not None:
        transformers_tokenizer(run, sentences, theirs)


def encode(setup, text: str) -> list[int]:
    return setup.tokenizer.encode(text, setup.folder.config.max_source_positions, setup.source_lang,
                                  setup.target_lang).tolist()


def transformers_tokenizer(run, sentences: list[str], theirs: list[list[int]]) -> None:
    """`AutoTokenizer.from_pretrained(DST)` (the card's line) against fairseq's encoder on the same sentences. A
    sentence it encodes otherwise is explained when fairport's encoder, given the text after the tokenizer's own
    normalisation step, gives its ids (FSMTTokenizer: Moses punctuation normalisation, which fairseq does not
    apply); anything else fails."""
    s = run.setup
    section = run.report.sections.setdefault("transformers", {})
    if not s.folder.file("tokenizer_config.json").exists():
        section["tokenizer"] = None
        run.report.note("transformers tokenizer not checked: the folder has no transformers tokenizer files")
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s.folder.path)
    normalise = getattr(tok, "moses_pipeline", None)
    explained, unexplained = [], []
    for i, (text, want) in enumerate(zip(sentences, theirs)):
        ids = tok(text)["input_ids"]
        if ids == want:
            continue
        if normalise is not None and encode(s, normalise(text, lang=tok.src_lang)) == ids:
            explained.append(i)
        else:
            unexplained.append(i)
    section["tokenizer"] = {"class": type(tok).__name__, "sentences": len(sentences),
                            "mismatches": (explained + unexplained)[:50], "explained": len(explained),
                            "rule": FSMT_RULE if explained else None, "unexplained": unexplained[:50]}
    detail = f"{len(explained) + len(unexplained)} of {len(sentences)} sentences differ" + (
        f" ({len(explained)} by the rule: {FSMT_RULE})" if explained else "")
    run.report.add("transformers tokenizer: AutoTokenizer ids equal fairseq's, or a named rule", not unexplained,
                   len(unexplained), 0, detail)
