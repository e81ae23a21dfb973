"""Corpus scores of generated text (BLEU with sacrebleu, ROUGE-L with rouge-score, where installed)."""

from __future__ import annotations


def bleu(hyps: list[str], refs: list[str]) -> float | None:
    try:
        import sacrebleu
    except ImportError:
        return None
    return round(float(sacrebleu.corpus_bleu(hyps, [refs]).score), 4)


def rouge_l(hyps: list[str], refs: list[str]) -> float | None:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return round(100 * sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / max(len(hyps), 1), 4)


def references(setup) -> list[str] | None:
    """The references as text (None without a text pipeline or references)."""
    inputs = setup.inputs
    if setup.tokenizer is None or not (inputs.ref_text or inputs.refs):
        return None
    return inputs.ref_text or [setup.text(r) for r in inputs.refs]
