"""Why the port's top hypothesis differs from the original's, with evidence a reader can check.

Each mismatch gets one class:
- batch-dependent original: run alone, the original gives the port's output; its output for this input depends
  on what it is batched with (padding changes the shapes of its products, and so their rounding).
- near-tie: both searches run again on the same batch, recording at every step the candidates each search
  ranked (fairseq's around `search.step`, the port's in its generation loop). At the first step whose selected
  hypotheses differ, the original ranks candidate A above B and the port ranks B above A. Each candidate's
  score is a sum of t+1 log-probabilities, each of which the two models may compute up to 2*delta apart
  (delta: the largest |logit difference| measured teacher-forced, fp32), so the margin between two candidates
  can move by up to 4 * delta * (t+1). A flip within that is a tie the two models break differently.
- search rule (engines only: transformers, CTranslate2): the engine's own scores explain its choice under a rule
  of its search that fairseq applies otherwise, named in the explanation (FORCED_FIRST, EOS_AT_LIMIT).
- divergence: anything else (a flip larger than that, a candidate one search did not consider, ...).
- not explained: once divergence is established (a failed logits check, or MAX_DIVERGENCES divergences on a side),
  the remaining mismatches are listed without running anything more; like a divergence, it fails.
"""

from __future__ import annotations

from fairport.validation.verify.report import num

NEAR_TIE, BATCH, DIVERGENCE = "near-tie", "batch-dependent original", "divergence"
SEARCH_RULE = "search rule"  # an engine's search applies a named rule otherwise (explained, not a failure)
UNEXPLAINED = "not explained"  # listed once divergence is established; fails like a divergence
CLASSES = (NEAR_TIE, BATCH, SEARCH_RULE, DIVERGENCE, UNEXPLAINED)
# search rules engines apply otherwise than fairseq, each a log-probability fairseq counts and the engine does not
FORCED_FIRST = ("the forced first token is scored 0 (transformers' forced_bos_token_id) where fairseq scores its "
                "log-probability, so finished hypotheses of different lengths rank otherwise under lenpen")
EOS_AT_LIMIT = ("at the length limit the final EOS is scored 0 (transformers' forced_eos_token_id; CTranslate2 stops "
                "without it) where fairseq forces EOS and scores its log-probability")
BANS_RENORMALISED = ("banned tokens (EOS before min_len, repeated n-grams, all but EOS at the length limit) are masked "
                     "before the softmax, so each step's other log-probabilities rise by -log(1 - banned mass) "
                     "(CTranslate2), where fairseq sets them to -inf after it; and a hypothesis cut at the length "
                     "limit is normalised by its length without the EOS: partial and finished hypotheses rank "
                     "otherwise")


def steps_of(trace: list[dict], row: int) -> list[dict]:
    """One sentence's view of a search trace (the records of fairseq's worker and of the port's generate): per
    step, the hypotheses entering it and the candidates ranked, as token tuples (without the start token)."""
    out = []
    for rec in trace:
        where = (rec["sentences"] == row).nonzero()
        if not len(where):
            break  # the sentence finished
        j = int(where[0])
        beam = rec["prev"].size(0) // rec["sentences"].numel()
        rows = [tuple(r) for r in rec["prev"][j * beam:(j + 1) * beam, 1:].tolist()]
        cands = [(rows[int(b)] + (int(tok),), float(s))
                 for s, tok, b in zip(rec["cand_scores"][j], rec["cand_indices"][j], rec["cand_beams"][j])]
        out.append({"entering": rows, "cands": cands})
    return out


def selected(steps: list[dict], finished: list[tuple], t: int) -> set[tuple]:
    """What a search kept at step t: the hypotheses entering step t + 1 and those it finished at step t."""
    kept = set(steps[t + 1]["entering"]) if t + 1 < len(steps) else set()
    return kept | {h for h in finished if len(h) == t + 1}


def first_parting(o_steps, p_steps, o_finished, p_finished) -> int | None:
    for t in range(max(len(o_steps), len(p_steps))):
        if selected(o_steps, o_finished, t) != selected(p_steps, p_finished, t):
            return t
    return None


def competitors(o_cands, p_cands, kept_o: set, kept_p: set) -> tuple[tuple | None, tuple | None]:
    """The two candidates the searches order differently where they part: A, which the original kept and the
    port did not (or ranked below B), and B, which the port kept and ranked above A."""
    rank_o = {seq: i for i, (seq, _) in enumerate(o_cands)}
    rank_p = {seq: i for i, (seq, _) in enumerate(p_cands)}
    only_o = [seq for seq, _ in o_cands if seq in kept_o - kept_p]
    only_p = [seq for seq, _ in p_cands if seq in kept_p - kept_o]
    far = len(o_cands) + len(p_cands)
    if only_o:  # A: the original's best such candidate; B: one the port put above it, the original below
        a = only_o[0]
        flipped = [seq for seq, _ in p_cands[: rank_p.get(a, far)] if rank_o.get(seq, far) > rank_o[a]]
        return a, min(flipped, key=lambda s: rank_o.get(s, far), default=None)
    if only_p:
        b = only_p[0]
        flipped = [seq for seq, _ in o_cands[: rank_o.get(b, far)] if rank_p.get(seq, far) > rank_p[b]]
        return min(flipped, key=lambda s: rank_p.get(s, far), default=None), b
    return None, None


def explain_tie(o_trace, p_trace, row: int, o_hyps: list[dict], p_hyps: list[dict], delta: float, text) -> dict:
    """Classify one sentence's mismatch from both searches' traces of the same batch. `o_hyps`/`p_hyps`: the
    sentence's finished hypotheses on each side (tokens, score); `text(ids)`: how to show a candidate."""
    o_finished = [tuple(h["tokens"]) for h in o_hyps]
    p_finished = [tuple(h["tokens"]) for h in p_hyps]
    o_steps, p_steps = steps_of(o_trace, row), steps_of(p_trace, row)
    t = first_parting(o_steps, p_steps, o_finished, p_finished)
    if t is None:  # the searches kept the same hypotheses all along: the final ranking differs
        o_scores = {tuple(h["tokens"]): h["score"] for h in o_hyps}
        p_scores = {tuple(h["tokens"]): h["score"] for h in p_hyps}
        a, b = o_finished[0], p_finished[0]
        tokens = max(len(a), len(b))
        where = "in the final ranking of the finished hypotheses (length-normalised scores)"
    else:
        o_cands = o_steps[t]["cands"] if t < len(o_steps) else []
        p_cands = p_steps[t]["cands"] if t < len(p_steps) else []
        a, b = competitors(o_cands, p_cands, selected(o_steps, o_finished, t), selected(p_steps, p_finished, t))
        o_scores, p_scores = dict(o_cands), dict(p_cands)
        tokens = t + 1
        where = f"at step {t}"
    tolerance = 4 * delta * tokens
    evidence = {"step": t, "original_choice": text(a) if a else None, "port_choice": text(b) if b else None,
                "tolerance": tolerance, "delta_logits": delta, "tokens": tokens}
    scores = {"original": {"A": o_scores.get(a), "B": o_scores.get(b)},
              "port": {"A": p_scores.get(a), "B": p_scores.get(b)}}
    evidence["scores"] = scores
    missing = [f"{c} under the {side}" for side, s in scores.items() for c, v in s.items()
               if v is None or v == float("-inf")]
    if a is None or b is None or missing:
        why = "one search kept a candidate the other never ranked" if a is None or b is None else \
            f"candidate {', '.join(missing)} was not among the search's candidates (or was banned)"
        return {"class": DIVERGENCE, "evidence": evidence,
                "explanation": f"the searches part {where}, and {why}: not a near-tie."}
    m_o = scores["original"]["A"] - scores["original"]["B"]
    m_p = scores["port"]["B"] - scores["port"]["A"]
    flip = m_o + m_p
    evidence |= {"margin": {"original": m_o, "port": m_p}, "flip": flip}
    so, sp = scores["original"], scores["port"]
    story = (f"the searches part {where}: the original scores its choice A {num(m_o)} above the port's choice B "
             f"({num(so['A'])} vs {num(so['B'])}), the port scores B {num(m_p)} above A ({num(sp['B'])} vs "
             f"{num(sp['A'])}); the models disagree by {num(flip)}")
    if m_o >= 0 and m_p >= 0 and flip <= tolerance:
        return {"class": NEAR_TIE, "evidence": evidence,
                "explanation": f"{story}, within {num(tolerance)} = 4 x max |Δ logit| {num(delta)} x {tokens} "
                               f"tokens: a tie the two models break differently, not a defect."}
    return {"class": DIVERGENCE, "evidence": evidence,
            "explanation": f"{story}, more than the {num(tolerance)} the measured logits |Δ| {num(delta)} allows "
                           f"over {tokens} tokens: the port's search or scores diverge here."}
