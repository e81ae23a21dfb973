"""BLEU and ROUGE-L of both sides' beam outputs against the references, and BLEU between the sides."""

from __future__ import annotations

from fairport.validation.verify.quality import bleu, references, rouge_l

NAME = "quality"


def report(run) -> None:
    s = run.setup
    if s.tokenizer is None:
        return
    hyp_o = [s.text(h["tokens"]) for h in run.outputs("original", "beam")]
    hyp_m = [s.text(h["tokens"]) for h in run.outputs("reference", "beam")]
    q: dict = {}
    refs = references(s)
    if refs:
        q["bleu"] = {"original": bleu(hyp_o, refs), "reference": bleu(hyp_m, refs)}
        q["rougeL"] = {"original": rouge_l(hyp_o, refs), "reference": rouge_l(hyp_m, refs)}
    q["bleu_between_sides"] = bleu(hyp_m, hyp_o)
    run.report.sections[NAME] = q
