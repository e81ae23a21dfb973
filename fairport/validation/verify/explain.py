"""Why an output differs from the original's, for every side verify checks: the port (both searches traced on
the same batch, verify/mismatch.py) and the engines (transformers, CTranslate2: from the outputs' own scores and
the original's traced beam), with one tally of the classes and the fail-fast rule (`explain_all`)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from fairport.reference.generate import generate
from fairport.validation.original.protocol import Generate, Score
from fairport.validation.verify.mismatch import (
    BANS_RENORMALISED,
    BATCH,
    CLASSES,
    DIVERGENCE,
    EOS_AT_LIMIT,
    FORCED_FIRST,
    NEAR_TIE,
    SEARCH_RULE,
    UNEXPLAINED,
    explain_tie,
    selected,
    steps_of,
)
from fairport.validation.verify.report import num

if TYPE_CHECKING:
    from fairport.validation.verify.run import VerifyRun

MAX_DIVERGENCES = 3  # divergences found on one side after which its other mismatches are not explained (no runs)


def on_device(t, device):
    return None if t is None else t.to(device)


def explain_all(run: VerifyRun, what: str, inputs: list[int], explain_one, divergent: str | None,
                found: list[int]) -> list[tuple[int, dict]]:
    """`explain_one(i)` for each mismatched input (a progress bar shows this phase), until divergence is
    established: from the start when `divergent` says why (a failed logits check), else once MAX_DIVERGENCES
    divergences are found on this side (`found` counts them across settings). Past that point the rest are listed
    as not explained, saying why, and nothing more runs: a wrong port fails about as fast as a right one passes."""
    from tqdm import tqdm

    out = []
    for i in tqdm(inputs, desc=f"explaining {what} mismatches", unit="input", file=sys.stderr, leave=False,
                  disable=not (run.setup.opts.progress and run.setup.ranks.main) or not inputs):
        why = divergent or (f"{found[0]} divergences were already found on this side"
                            if found[0] >= MAX_DIVERGENCES else None)
        if why:
            out.append((i, {"class": UNEXPLAINED, "evidence": {},
                            "explanation": f"not explained: {why}, so the outputs diverge; explaining stopped "
                                           f"there (the per-layer curve and the divergences above say where)."}))
            continue
        result = explain_one(i)
        found[0] += result["class"] == DIVERGENCE
        out.append((i, result))
    return out


def tally(run: VerifyRun, title: str, mismatches: list[dict], n: int) -> tuple[dict, float, float]:
    """The class counts of one side's mismatches in one setting, and its checks: every mismatch explained (no
    divergence, none left unexplained), and near-ties and batch effects within --max-tie-rate."""
    counts = {c: sum(m["class"] == c for m in mismatches) for c in CLASSES}
    rate, explained = 1 - len(mismatches) / max(n, 1), (counts[NEAR_TIE] + counts[BATCH]) / max(n, 1)
    failed = counts[DIVERGENCE] + counts[UNEXPLAINED]
    detail = f"{len(mismatches)} of {n} differ: " + ", ".join(f"{v} {c}" for c, v in counts.items() if v) \
        if mismatches else f"0 of {n} differ"
    o = run.setup.opts
    if not (o.strict and title.startswith("generation")):
        run.report.add(f"{title}: every mismatch explained", failed == 0, failed, 0, detail)
        bound = o.max_tie_rate
        run.report.add(f"{title}: near-ties and batch effects within --max-tie-rate", explained <= bound, explained,
                       bound, f"exact match {rate:.1%}")
    else:
        run.report.add(f"{title}: top hypothesis exact match", rate >= o.exact_match, rate, o.exact_match, detail)
    return counts, rate, explained


def traced(run: VerifyRun, b: int, key: str, options: dict) -> tuple[dict, list, list]:
    """Both searches traced on batch b in setting `key`, run once and shared by every mismatch of that batch."""
    if (b, key) not in run.traces:
        s = run.setup
        src = s.src_batch(b)
        o = run.fairseq()(Generate(src, options, prefix=s.prefix(src.size(0)), force_bos=s.framing.bart, trace=True))
        trace: list = []
        p = generate(s.port, src.to(s.device), prefix_tokens=on_device(s.prefix(src.size(0)), s.device),
                     trace=trace, **options)
        run.traces[(b, key)] = (o, trace, p)
    return run.traces[(b, key)]


def original_alone(run: VerifyRun, i: int, options: dict) -> list[int]:
    """The original's top hypothesis for input i generated in a batch of its own."""
    s = run.setup
    out = run.fairseq()(Generate(torch.tensor([s.inputs.src[i]]), options, prefix=s.prefix(1),
                                 force_bos=s.framing.bart))
    return out.hypotheses[0][0]["tokens"].tolist()


def explain(run: VerifyRun, key: str, options: dict, i: int) -> dict:
    """Why input i's top hypotheses differ (setting `key`): the original alone, then both searches traced on
    the same batch."""
    s = run.setup
    b = s.batch_of(i)
    row = s.batches[b].index(i)
    mine_top = run.outputs("reference", key)[i]["tokens"]
    alone_tokens = original_alone(run, i, options)
    o, trace, p = traced(run, b, key, options)
    why = explain_tie(o.trace, trace, row, hyps_of(o.hypotheses[row]), hyps_of(p[row]), run.delta, s.text)
    why["evidence"]["original_alone"] = s.text(alone_tokens)
    if alone_tokens == mine_top:
        why = {"class": BATCH, "evidence": why["evidence"],
               "explanation": f"run alone, the original gives the port's output: its output for this input depends "
                              f"on what it is batched with (here a batch of {len(s.batches[b])}). Searches in that "
                              f"batch: {why['explanation']}"}
    return why


def hyps_of(hs: list[dict]) -> list[dict]:
    return [{"tokens": h["tokens"].tolist(), "score": float(h["score"])} for h in hs]


def engine_generation(run: VerifyRun, name: str, side, eps: float, divergent: str | None, forced_first: bool) -> dict:
    """An engine's outputs (transformers', CTranslate2's) against the original's in each setting: exact match,
    every mismatch explained from the outputs' own scores (an engine's search cannot be traced), checks named
    after the engine. `forced_first`: the engine scores a forced first token 0 (see explain_engine)."""
    s, section = run.setup, {}
    found = [0]
    for key, options in s.settings.items():
        theirs, mine = run.outputs("original", key), run.outputs(name, key)
        diff = [i for i, (a, b) in enumerate(zip(theirs, mine)) if a["tokens"] != b["tokens"]]
        mismatches = []
        def one(i, options=options, key=key, theirs=theirs, mine=mine):
            return explain_engine(run, name, side, options, i, theirs[i]["tokens"], mine[i]["tokens"], eps,
                                  key == "greedy", forced_first)

        for i, why in explain_all(run, f"{name}'s {key}", diff, one, divergent, found):
            mismatches.append({"input": i, "original": s.text(theirs[i]["tokens"]),
                               name: s.text(mine[i]["tokens"]), **why})
        counts, rate, _ = tally(run, f"{name} generation ({key})", mismatches, len(theirs))
        seconds = sum(r.seconds[key] for r in run.results_of(name))
        section[key] = {"options": options, "exact_match": rate, "counts": counts, "mismatches": mismatches,
                        "seconds": seconds, "sentences_per_s": len(theirs) / max(seconds, 1e-9)}
    return section


def explain_engine(run: VerifyRun, name: str, side, options: dict, i: int, a: list[int], c: list[int], eps: float,
                   greedy: bool, forced_first: bool) -> dict:
    """The original's output A and the engine's C for input i: the original alone, then both models'
    teacher-forced scores of both (greedy: at the first token where they part; beam: whole, length-normalised
    as fairseq ranks finished hypotheses). Each log-prob may differ by `eps` between the models. Where the
    engine's own scores rank A higher, its search chose otherwise: if its own scores rank C higher once the
    log-probabilities its search does not count are left out (a forced first token, `forced_first`; an EOS at the
    length limit), that named rule explains it (SEARCH_RULE), else it is a divergence."""
    s = run.setup
    alone = original_alone(run, i, options)
    evidence: dict = {"original_alone": s.text(alone)}
    if alone == c:
        return {"class": BATCH, "evidence": evidence, "explanation": f"run alone, the original gives {name}'s "
                "output: its output for this input depends on what it is batched with."}
    cfg = s.folder.config
    start = s.settings["beam"].get("eos", cfg.eos)
    src = torch.tensor([s.inputs.src[i]])
    both = src.repeat(2, 1)  # the input once for each output scored
    so = run.fairseq()(Score(both, [a, c], start)).log_probs
    sc = side.score(both, [a, c], cfg.pad, start)
    t = next((k for k, (x, y) in enumerate(zip(a, c)) if x != y), min(len(a), len(c)) - 1)
    lenpen = options.get("lenpen", 1.0)
    if greedy:
        m_o, m_c = so[0][t] - so[1][t], sc[1][t] - sc[0][t]
        tolerance, where = 2 * eps, f"at token {t}"
    else:
        norm = [sum(x) / len(x) ** lenpen for x in (*so, *sc)]
        m_o, m_c = norm[0] - norm[1], norm[3] - norm[2]
        tolerance, where = 2 * eps * max(len(a), len(c)), "on the whole hypotheses (length-normalised)"
    evidence |= {"step": t, "margin": {"original": m_o, name: m_c}, "flip": m_o + m_c, "tolerance": tolerance,
                 "delta_log_probs": eps}
    if m_c < 0:  # the engine's own scores rank the original's output higher: its search chose otherwise
        width = s.src_batch(s.batch_of(i)).size(1)
        limit = min(int(options.get("max_len_a", 0) * width + options.get("max_len_b", 200)),
                    cfg.max_target_positions - 1) + 1  # tokens with the EOS fairseq forces at max_len
        rules = [r for r, holds in ((FORCED_FIRST, forced_first and a[:1] == c[:1]),
                                    (EOS_AT_LIMIT, limit in (len(a), len(c)))) if holds]
        if rules and not greedy:
            own = [(sum(x) - (x[0] if forced_first else 0) - (x[-1] if len(x) == limit else 0)) / len(x) ** lenpen
                   for x in sc]  # the engine's own scores, without what its search does not count
            evidence["margin_under_its_rules"] = own[1] - own[0]
            if own[1] >= own[0]:
                return {"class": SEARCH_RULE, "rules": rules, "evidence": evidence, "explanation": (
                    f"{where}, {name}'s own scores rank the original's output {num(-m_c)} higher as fairseq scores "
                    f"it, and its own output {num(own[1] - own[0])} higher as its search scores it: "
                    + "; ".join(rules) + ".")}
        if (why := under_engine_rule(run, name, side, options, i, c, greedy, evidence, tolerance)) is not None:
            return why
        return {"class": DIVERGENCE, "evidence": evidence, "explanation": (
            f"{where}, {name}'s own scores rank the original's output {num(-m_c)} above its own (the original's: "
            f"{num(m_o)}): its search returned a hypothesis it scores lower, so its search (length normalisation, "
            f"stopping) differs from fairseq's here, not its numbers.")}
    story = (f"{where}, the original prefers its output by {num(m_o)} and {name} its own by {num(m_c)} "
             f"(teacher-forced); they disagree by {num(m_o + m_c)}")
    if m_o >= 0 and m_o + m_c <= tolerance:
        return {"class": NEAR_TIE, "evidence": evidence,
                "explanation": f"{story}, within {num(tolerance)} of the measured log-prob |Δ| {num(eps)}: a tie."}
    if m_o < 0 and not greedy:  # the original's own numbers prefer the engine's output: its beam dropped it
        pruned = pruned_near_tie(run, options, i, c, eps)
        if pruned is not None:
            evidence["pruning"] = pruned
            return {"class": NEAR_TIE, "evidence": evidence, "explanation": (
                f"{story}: the original's own scores rank {name}'s output {num(-m_o)} higher, but its beam dropped "
                f"that hypothesis at step {pruned['step']}, where it scored {num(pruned['margin'])} below the last "
                f"one kept, within the {num(pruned['tolerance'])} that {pruned['step'] + 1} tokens of log-prob |Δ| "
                f"{num(eps)} allow: a pruning tie the two searches broke differently.")}
    if (why := under_engine_rule(run, name, side, options, i, c, greedy, evidence, tolerance)) is not None:
        return why
    return {"class": DIVERGENCE, "evidence": evidence,
            "explanation": f"{story}: not within the {num(tolerance)} the measured log-prob |Δ| allows, nor a tie "
                           f"in the original's beam: {name}'s numbers or search differ here."}


def under_engine_rule(run: VerifyRun, name: str, side, options: dict, i: int, c: list[int], greedy: bool,
                      evidence: dict, tolerance: float) -> dict | None:
    """An engine whose search masks banned tokens before the softmax (CTranslate2: EOS before min_len, repeated
    n-grams, the length limit; `side.renormalises_bans`) ranks and prunes partial hypotheses by other scores than
    fairseq. The evidence: the port's search (fairseq's loop), run on input i alone with that one rule changed,
    returns the engine's output `c` (or ranks it within `tolerance` of its first: a tie under that rule). A
    SEARCH_RULE explanation when it does, else None. Greedy search is never affected (renormalising does not
    move the argmax)."""
    if greedy or not getattr(side, "renormalises_bans", False):
        return None
    s = run.setup
    src = torch.tensor([s.inputs.src[i]], device=s.device)
    hyps = generate(s.port, src, prefix_tokens=on_device(s.prefix(1), s.device), ctranslate2_rules=True, **options)[0]
    ranked = [(h["tokens"].tolist(), float(h["score"])) for h in hyps]
    evidence["under_its_rule"] = s.text(ranked[0][0])
    story = f"fairseq's search on the port, run alone with {name}'s rule ({BANS_RENORMALISED}), returns"
    if ranked[0][0] == c:
        return {"class": SEARCH_RULE, "rules": [BANS_RENORMALISED], "evidence": evidence, "explanation": (
            f"{story} {name}'s output: the searches differ by that rule, not by their numbers.")}
    score = next((v for h, v in ranked if h == c), None)
    if score is None or ranked[0][1] - score > tolerance:
        return None
    evidence["tie_under_its_rule"] = ranked[0][1] - score
    return {"class": SEARCH_RULE, "rules": [BANS_RENORMALISED], "evidence": evidence, "explanation": (
        f"{story} {name}'s output second, {num(ranked[0][1] - score)} below its first, within the {num(tolerance)} "
        f"the measured log-prob |Δ| allows: under that rule the two are tied, and the engines break the tie "
        f"differently.")}


def pruned_near_tie(run: VerifyRun, options: dict, i: int, c: list[int], eps: float) -> dict | None:
    """Where the original's beam search (traced on input i's batch) dropped the prefix of the engine's output
    `c`: the step, and how far below the last hypothesis kept there it scored. A near-tie (the dict) when that
    margin is within what `eps` per token allows the two models' scores to move (2 x eps x tokens), else None."""
    s = run.setup
    b = s.batch_of(i)
    key = next(k for k, o in s.settings.items() if o == options)
    o, _, _ = traced(run, b, key, options)
    row = s.batches[b].index(i)
    steps = steps_of(o.trace, row)
    finished = [tuple(h["tokens"]) for h in hyps_of(o.hypotheses[row])]
    for t in range(min(len(steps), len(c))):
        kept = selected(steps, finished, t)
        prefix = tuple(c[: t + 1])
        if prefix in kept:
            continue
        scores = dict(steps[t]["cands"])
        lowest_kept = min((v for seq, v in scores.items() if seq in kept), default=None)
        if prefix not in scores or lowest_kept is None:
            return None
        margin, tolerance = lowest_kept - scores[prefix], 2 * eps * (t + 1)
        return {"step": t, "margin": margin, "tolerance": tolerance} if margin <= tolerance else None
    return None
