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
    sentence it encodes otherwise is explained only by a named rule checked on its evidence (`rule_for`);
    anything else fails."""
    s = run.setup
    section = run.report.sections.setdefault("transformers", {})
    if not s.folder.file("tokenizer_config.json").exists():
        section["tokenizer"] = None
        run.report.note("transformers tokenizer not checked: the folder has no transformers tokenizer files")
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s.folder.path)
    rule_for = explainer(s, tok)
    encode_ids = as_deployed(run, tok)
    explained, unexplained, rules = [], [], {}
    for i, (text, want) in enumerate(zip(sentences, theirs)):
        ids = encode_ids(text)
        if ids == want:
            continue
        rule = rule_for(text, ids)
        if rule is None:
            unexplained.append(i)
        else:
            explained.append(i)
            rules[rule] = rules.get(rule, 0) + 1
    section["tokenizer"] = {
        "class": type(tok).__name__, "sentences": len(sentences), "mismatches": sorted(explained + unexplained)[:50],
        "explained": len(explained), "differ": len(explained) + len(unexplained), "rule": "; ".join(rules) or None,
        "rules": rules, "unexplained": unexplained[:50]}
    detail = f"{len(explained) + len(unexplained)} of {len(sentences)} sentences differ" + "".join(
        f" ({n} by the rule: {rule})" for rule, n in rules.items())
    run.report.add("transformers tokenizer: AutoTokenizer ids equal fairseq's, or a named rule", not unexplained,
                   len(unexplained), 0, detail)


def as_deployed(run, tok):
    """text -> the ids the tokenizer gives as users run it: `tok(text)` with its template, which frames the
    folder's default direction; in another direction of a many-to-many model, its ids (add_special_tokens=False)
    framed as fairport frames them, as the card and provenance tell users to (a note says so)."""
    s = run.setup
    framing = s.tokenizer.framing
    if not framing.multi or (s.source_lang, s.target_lang) == framing.default_direction():
        return lambda text: tok(text)["input_ids"]
    src, tgt = framing.default_direction()
    run.report.note(f"transformers tokenizer: its template frames {src}->{tgt}; for {s.source_lang}->"
                    f"{s.target_lang} its ids (add_special_tokens=False) were framed as fairport frames them")
    return lambda text: framing.source(tok(text, add_special_tokens=False)["input_ids"],
                                       s.folder.config.max_source_positions, s.source_lang, s.target_lang)


def explainer(setup, tok):
    """rule_for(text, ids) -> the named rule that explains why the tokenizer's `ids` for `text` are not fairseq's,
    or None. FSMTTokenizer: fairport's encoder, given the text after the tokenizer's own Moses normalisation,
    gives its ids. sentencepiece folders: spm_tokenizer.explain on fairseq's pieces and the tokenizer's."""
    normalise = getattr(tok, "moses_pipeline", None)
    if normalise is not None:
        return lambda text, ids: FSMT_RULE if encode(setup, normalise(text, lang=tok.src_lang)) == ids else None
    if setup.tokenizer.spec.get("bpe") != "sentencepiece" or setup.tokenizer.pre is not None:
        return lambda text, ids: None
    sp = setup.tokenizer.bpe
    from fairport.converters import spm_tokenizer

    model = spm_tokenizer.SpmModel.read(setup.folder.file("sentencepiece.bpe.model"))

    def rule_for(text: str, ids: list[int]) -> str | None:
        tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        return spm_tokenizer.explain(model, setup.tokenizer.src_dict, text, sp.apply(text).split(), tokens)

    return rule_for
