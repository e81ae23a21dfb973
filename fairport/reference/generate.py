"""fairseq-exact generation: beam search, greedy, sampling and ensembles, as small functions.

This follows fairseq's `SequenceGenerator._generate` (0.12) step for step, because token-identical output
depends on the details: 2*beam candidates per step, EOS candidates finalised only from the top `beam`,
scores normalised by `(step + 1) ** lenpen` at finalisation, finished sentences leaving the batch,
max length `min(max_len_a * src_width + max_len_b, max_positions - 1)`, prefix forcing with the prefix
token scored, and the final sort by score.

Two deliberate differences from the installed fairseq 0.12:
- no-repeat-ngram blocking compares the hypothesis' real last n-1 tokens (as fairseq 0.10.2 and its CUDA
  kernel do, which produced its published results); 0.12's Python fallback compares the padded tail of the
  token buffer and never blocks;
- cross-attention keys/values are computed once per source sentence and shared by its beams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from fairport.reference.model import EncoderDecoder, EncoderOut, LayerCache


def _option(default, help: str, cli: str | None = None):
    """A generation option: its fairseq default, a description, and which CLI verbs offer it as a flag
    ("search": convert and generate; "sample": generate only)."""
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class GenerationOptions:
    """fairseq's generation options, with fairseq's names and defaults: the one table of them. The converter
    writes it to generation_config.json ("fairseq"), the CLI offers its flags, the original's worker builds
    fairseq's SequenceGenerator from it."""

    beam: int = _option(5, "beam size (1: greedy)", "search")
    lenpen: float = _option(1.0, "length penalty: scores divided by length ** lenpen", "search")
    max_len_a: float = _option(0.0, "max length = max_len_a * source length + max_len_b", "search")
    max_len_b: int = _option(200, "max length = max_len_a * source length + max_len_b", "search")
    min_len: int = _option(1, "minimum length (EOS banned before)", "search")
    no_repeat_ngram_size: int = _option(0, "ban repeating n-grams of this size (0: off)", "search")
    unkpen: float = _option(0.0, "penalty subtracted from <unk>'s log-probability")
    temperature: float = _option(1.0, "divide logits by this before the softmax", "sample")
    match_source_len: bool = _option(False, "generate exactly as many tokens as the source has")
    sampling: bool = _option(False, "sample instead of beam search", "sample")
    sampling_topk: int = _option(-1, "sample from the k most likely tokens (-1: all)", "sample")
    sampling_topp: float = _option(-1.0, "sample from the smallest set with probability >= p (-1: off)", "sample")
    normalize_scores: bool = _option(True, "finished hypotheses' scores divided by length ** lenpen")
    eos: int | None = _option(None, "the generator's EOS and first decoder token (None: the dictionary's </s>)")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class StepState(Protocol):
    """What the search loop needs of one model's decoder during generation. DecoderState (eager, below) and
    compiled.CompiledDecoderState (the compiled step) implement it; both run Decoder.embed and Decoder.head."""

    def step(self, tokens: torch.Tensor, step: int, temperature: float) -> torch.Tensor:
        """Newest tokens (rows, 1) at 0-based `step` -> log-probabilities (rows, V) in fp32."""

    def keep_sentences(self, sentence_idx: torch.Tensor) -> None:
        """Finished sentences leave the batch: keep only these sentences' encoder rows."""

    def reorder(self, order: torch.Tensor) -> None:
        """Keep the decoder rows (sentences x beams) in `order`."""


class DecoderState:
    """One model's state during generation: encoder output, per-layer caches (StepState, eager)."""

    def __init__(self, model: EncoderDecoder, src_tokens: torch.Tensor):
        self.model = model
        self.enc = model.encoder(src_tokens)  # (B, S, C), one row per source sentence
        self.caches = [LayerCache() for _ in model.decoder.layers]

    def keep_sentences(self, sentence_idx: torch.Tensor) -> None:
        """Finished sentences leave the batch: keep encoder rows and cross-attention k/v of the rest."""
        self.enc = EncoderOut(self.enc.x.index_select(0, sentence_idx),
                              self.enc.padding_mask.index_select(0, sentence_idx))
        for c in self.caches:
            if c.cross_k is not None:
                c.cross_k = c.cross_k.index_select(0, sentence_idx)
                c.cross_v = c.cross_v.index_select(0, sentence_idx)

    def reorder(self, order: torch.Tensor) -> None:
        for c in self.caches:
            c.reorder(order)

    def step(self, tokens: torch.Tensor, step: int, temperature: float) -> torch.Tensor:
        """Newest tokens (B*beam, 1) -> log-probabilities (B*beam, V) in fp32."""
        logits = self.model.decoder(tokens, self.enc, self.caches, step)[:, -1, :]
        if temperature != 1.0:
            logits = logits.div(temperature)
        return torch.log_softmax(logits.float(), dim=-1)


def decoder_state(model: EncoderDecoder, src_tokens: torch.Tensor, rows: int, steps: int) -> StepState:
    """The eager DecoderState, or the compiled step's state (compiled.py) when the model has one."""
    compiled = getattr(model, "compiled_step", None)
    return DecoderState(model, src_tokens) if compiled is None else compiled.state(src_tokens, rows, steps)


def ensemble_lprobs(states: list[StepState], tokens: torch.Tensor, step: int, temperature: float):
    """fairseq EnsembleModel: one model's log-probs, or the log of the mean of the models' probabilities."""
    lps = [s.step(tokens, step, temperature) for s in states]
    if len(lps) == 1:
        return lps[0]
    return torch.logsumexp(torch.stack(lps, dim=0), dim=0) - math.log(len(lps))


def beam_search_step(step: int, lprobs: torch.Tensor, scores: torch.Tensor, beam: int):
    """fairseq search.BeamSearch.step. lprobs (B, beam, V); scores (B, beam, step)."""
    bsz, _, vocab = lprobs.shape
    if step == 0:  # all beams are identical at the start: look at the first one only
        lprobs = lprobs[:, ::beam, :].contiguous()
    else:
        lprobs = lprobs + scores[:, :, step - 1].unsqueeze(-1)
    flat = lprobs.view(bsz, -1)
    top_scores, top_idx = torch.topk(flat, k=min(2 * beam, flat.size(1) - 1))
    return top_scores, top_idx.fmod(vocab), torch.div(top_idx, vocab, rounding_mode="trunc")


def _sample_topp(lprobs: torch.Tensor, topp: float):
    probs = lprobs.exp_()
    sorted_probs, sorted_indices = probs.sort(descending=True)
    mask = sorted_probs.cumsum(dim=2).lt(topp)
    last_included = mask.cumsum(dim=2)[:, :, -1:]
    last_included.clamp_(0, mask.size(2) - 1)
    mask = mask.scatter_(2, last_included, 1)
    max_dim = last_included.max()
    probs = sorted_probs[:, :, : max_dim + 1].masked_fill_(~mask[:, :, : max_dim + 1], 0)
    return probs, sorted_indices[:, :, : max_dim + 1]


def sampling_step(step: int, lprobs: torch.Tensor, scores: torch.Tensor, beam: int, topk: int, topp: float):
    """fairseq search.Sampling.step (same calls to torch.multinomial, so the same seed gives the same tokens)."""
    bsz = lprobs.size(0)
    if step == 0:
        lprobs = lprobs[:, ::beam, :].contiguous()
    top_indices = None
    if topp > 0:
        probs, top_indices = _sample_topp(lprobs, topp)
    elif topk > 0:
        lprobs, top_indices = lprobs.topk(topk)
        probs = lprobs.exp_()
    else:
        probs = lprobs.exp_()
    if step == 0:
        idx = torch.multinomial(probs.view(bsz, -1), beam, replacement=True).view(bsz, beam)
        probs = probs.expand(bsz, beam, -1)
    else:
        idx = torch.multinomial(probs.view(bsz * beam, -1), 1, replacement=True).view(bsz, beam)
    cand_scores = torch.gather(probs, dim=2, index=idx.unsqueeze(-1)).log_().view(bsz, -1)
    if top_indices is not None:
        idx = torch.gather(top_indices.expand(bsz, beam, -1), dim=2, index=idx.unsqueeze(-1)).squeeze(2)
    if step == 0:
        beams = idx.new_zeros(bsz, beam)
    else:
        beams = torch.arange(0, beam).to(idx).repeat(bsz, 1)
        cand_scores.add_(torch.gather(scores[:, :, step - 1], dim=1, index=beams))
    return cand_scores, idx, beams


def block_repeated_ngrams(tokens: torch.Tensor, lprobs: torch.Tensor, n: int, step: int) -> None:
    """Ban every token that would repeat an n-gram already in the hypothesis (in place).
    tokens (B*beam, step+1) starting with the decoder's start token."""
    start = step + 2 - n  # number of complete earlier n-grams
    if start < 0:
        return
    rows = tokens.tolist()
    for r, row in enumerate(rows):
        tail = row[step + 2 - n: step + 1]
        banned = [row[i + n - 1] for i in range(start) if row[i:i + n - 1] == tail]
        if banned:
            lprobs[r, torch.tensor(banned, dtype=torch.long)] = -math.inf


def _replicate_first_beam(t: torch.Tensor, mask: torch.Tensor, beam: int) -> torch.Tensor:
    t = t.view(-1, beam, t.size(-1))
    t[mask] = t[mask][:, :1, :]
    return t.view(-1, t.size(-1))


def force_prefix(step, lprobs, scores, tokens, prefix_tokens, beam, pad, eos):
    """fairseq SequenceGenerator._prefix_tokens: only the prefix token keeps its (real) log-prob."""
    prefix_toks = prefix_tokens[:, step].unsqueeze(-1).repeat(1, beam).view(-1)
    prefix_lprobs = lprobs.gather(-1, prefix_toks.unsqueeze(-1))
    prefix_mask = prefix_toks.ne(pad)
    lprobs[prefix_mask] = -math.inf
    lprobs[prefix_mask] = lprobs[prefix_mask].scatter(-1, prefix_toks[prefix_mask].unsqueeze(-1),
                                                      prefix_lprobs[prefix_mask])
    eos_mask = prefix_toks.eq(eos)
    if eos_mask.any():  # a prefix that ends a sentence: all beams continue from the first one
        eos_mask_batch = eos_mask.view(-1, beam)[:, 0]
        tokens = _replicate_first_beam(tokens, eos_mask_batch, beam)
        scores = _replicate_first_beam(scores, eos_mask_batch, beam)
        lprobs = _replicate_first_beam(lprobs, eos_mask_batch, beam)
    return lprobs, tokens, scores


def generate(model, src_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None = None,
             bos_token: int | None = None, trace: list | None = None, ctranslate2_rules: bool = False,
             **options) -> list[list[dict]]:
    """Generate for each source row (left-padded ids) with fairseq's options (GenerationOptions' names).
    `model`: an EncoderDecoder, or an ensemble (anything with `.members`), decoded as fairseq's EnsembleModel.
    Returns, per sentence, hypotheses best first: {"tokens" (ending in EOS, no start token), "score",
    "positional_scores"} as fairseq returns them. Runs under torch.inference_mode (no autograd bookkeeping:
    measured ~14% less per-step overhead than no_grad on a small model); the tensors returned are ordinary.
    `trace`: a list that receives, at each step, what the search saw and chose, in the form the original's
    worker records fairseq's search (fairport/validation/verify/mismatch.py compares the two).
    `ctranslate2_rules`: not fairseq's search but CTranslate2's two differences from it, for verify's explanations:
    every ban (EOS before min_len, repeated n-grams, all but EOS at the length limit) is applied before the softmax,
    renormalising the step's other log-probabilities, and a hypothesis cut at the length limit counts its length
    without the EOS (CTranslate2 ends it there without one)."""
    opts = GenerationOptions(**options)
    models = list(getattr(model, "members", None) or [model])
    with torch.inference_mode():
        finalized = _generate(models, src_tokens, prefix_tokens, bos_token, opts, trace, ctranslate2_rules)
    return [[{k: v.clone() for k, v in h.items()} for h in hyps] for hyps in finalized]


def _generate(models: list[EncoderDecoder], src_tokens, prefix_tokens, bos_token, opts: GenerationOptions,
              trace: list | None = None, ctranslate2_rules: bool = False) -> list[list[dict]]:
    cfg = models[0].config
    pad, unk = cfg.pad, cfg.unk
    eos = cfg.eos if opts.eos is None else opts.eos
    vocab = cfg.tgt_vocab_size
    beam = min(opts.beam, vocab - 1)
    device = src_tokens.device

    bsz, src_width = src_tokens.shape
    src_lengths = (src_tokens.ne(eos) & src_tokens.ne(pad)).long().sum(dim=1)
    if opts.match_source_len:
        max_len = int(src_lengths.max().item())
    else:
        max_positions = min(m.config.max_target_positions for m in models)
        max_len = min(int(opts.max_len_a * src_width + opts.max_len_b), max_positions - 1)
    if opts.min_len > max_len:
        raise ValueError("min_len cannot be larger than max_len, please adjust these!")

    states = [decoder_state(m, src_tokens, bsz * beam, max_len + 1) for m in models]
    scores = torch.zeros(bsz * beam, max_len + 1, device=device, dtype=torch.float)
    tokens = torch.full((bsz * beam, max_len + 2), pad, dtype=torch.long, device=device)
    tokens[:, 0] = eos if bos_token is None else bos_token
    cands_to_ignore = torch.zeros(bsz, beam, dtype=torch.bool, device=device)
    finalized: list[list[dict]] = [[] for _ in range(bsz)]
    finished = [False] * bsz
    remaining = bsz
    cand_size = 2 * beam
    bbsz_offsets = (torch.arange(0, bsz) * beam).unsqueeze(1).to(tokens)
    cand_offsets = torch.arange(0, cand_size).to(tokens)
    pad_only, pad_eos = torch.tensor([pad], device=device), torch.tensor([pad, eos], device=device)
    sentences = torch.arange(bsz, device=device)  # which input sentence each batch row is (fairseq's
    # original_batch_idxs)
    reorder_state: torch.Tensor | None = None  # decoder rows are sentences x beams
    batch_idxs: torch.Tensor | None = None  # encoder rows stay one per sentence

    for step in range(max_len + 1):  # one extra step for EOS
        if reorder_state is not None:
            if batch_idxs is not None:
                corr = batch_idxs - torch.arange(batch_idxs.numel()).to(batch_idxs)
                reorder_state.view(-1, beam).add_(corr.unsqueeze(-1) * beam)
                for s in states:
                    s.keep_sentences(batch_idxs)
            for s in states:
                s.reorder(reorder_state)
        lprobs = ensemble_lprobs(states, tokens[:, step:step + 1], step, opts.temperature)

        lprobs.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN -> -inf, one kernel
        forcing = prefix_tokens is not None and step < prefix_tokens.size(1) and step < max_len
        # pad is never generated; nor is EOS before min_len (unless a prefix is being forced)
        lprobs.index_fill_(1, pad_eos if not forcing and step < opts.min_len else pad_only, -math.inf)
        if opts.unkpen:
            lprobs[:, unk] -= opts.unkpen
        if step >= max_len:  # only EOS may follow at the last step
            lprobs[:, :eos] = -math.inf
            lprobs[:, eos + 1:] = -math.inf
        if forcing:
            lprobs, tokens, scores = force_prefix(step, lprobs, scores, tokens, prefix_tokens, beam, pad, eos)
        if opts.no_repeat_ngram_size > 0:
            block_repeated_ngrams(tokens[:, : step + 1], lprobs, opts.no_repeat_ngram_size, step)
        if ctranslate2_rules:
            lprobs = torch.log_softmax(lprobs, dim=-1)

        if opts.sampling:
            cand_scores, cand_indices, cand_beams = sampling_step(
                step, lprobs.view(bsz, -1, vocab), scores.view(bsz, beam, -1)[:, :, :step], beam,
                opts.sampling_topk, opts.sampling_topp)
        else:
            cand_scores, cand_indices, cand_beams = beam_search_step(
                step, lprobs.view(bsz, -1, vocab), scores.view(bsz, beam, -1)[:, :, :step], beam)
        if trace is not None:
            trace.append({k: v.to("cpu", copy=True) for k, v in (
                ("sentences", sentences), ("prev", tokens[:, : step + 1]), ("cand_scores", cand_scores),
                ("cand_indices", cand_indices), ("cand_beams", cand_beams))})
        cand_bbsz_idx = cand_beams.add(bbsz_offsets)

        # finalise hypotheses that end in EOS among the top `beam` candidates
        eos_mask = cand_indices.eq(eos) & cand_scores.ne(-math.inf)
        eos_mask[:, :beam].masked_fill_(cands_to_ignore, False)
        eos_bbsz_idx = torch.masked_select(cand_bbsz_idx[:, :beam], mask=eos_mask[:, :beam])
        finalized_sents: list[int] = []
        if eos_bbsz_idx.numel() > 0:
            eos_scores = torch.masked_select(cand_scores[:, :beam], mask=eos_mask[:, :beam])
            finalized_sents = _finalize(step, eos_bbsz_idx, eos_scores, tokens, scores, finalized, finished,
                                        beam, src_lengths, max_len, opts, eos,
                                        ctranslate2_rules and step >= max_len)
            remaining -= len(finalized_sents)
        if remaining == 0:
            break
        assert step < max_len

        if finalized_sents:  # drop finished sentences from the batch
            new_bsz = bsz - len(finalized_sents)
            batch_mask = torch.ones(bsz, dtype=torch.bool, device=device)
            batch_mask[finalized_sents] = False
            batch_idxs = torch.arange(bsz, device=device).masked_select(batch_mask)
            eos_mask = eos_mask[batch_idxs]
            cand_beams = cand_beams[batch_idxs]
            bbsz_offsets.resize_(new_bsz, 1)
            cand_bbsz_idx = cand_beams.add(bbsz_offsets)
            cand_scores = cand_scores[batch_idxs]
            cand_indices = cand_indices[batch_idxs]
            if prefix_tokens is not None:
                prefix_tokens = prefix_tokens[batch_idxs]
            src_lengths = src_lengths[batch_idxs]
            sentences = sentences[batch_idxs]
            cands_to_ignore = cands_to_ignore[batch_idxs]
            scores = scores.view(bsz, -1)[batch_idxs].view(new_bsz * beam, -1)
            tokens = tokens.view(bsz, -1)[batch_idxs].view(new_bsz * beam, -1)
            bsz = new_bsz
        else:
            batch_idxs = None

        # keep the best `beam` candidates that do not end in EOS
        eos_mask[:, :beam].logical_or_(cands_to_ignore)  # fairseq writes it ~(~ignore & ~eos)
        active_mask = torch.add(eos_mask.type_as(cand_offsets) * cand_size, cand_offsets[: eos_mask.size(1)])
        new_cands_to_ignore, active_hypos = torch.topk(active_mask, k=beam, dim=1, largest=False)
        cands_to_ignore = new_cands_to_ignore.ge(cand_size)[:, :beam]
        active_bbsz_idx = torch.gather(cand_bbsz_idx, dim=1, index=active_hypos).view(-1)
        if beam > 1:  # with one beam every row continues itself: nothing to reorder
            # whole rows: the columns past `step` are still pad (tokens) and 0 (scores) in every row
            tokens = tokens.index_select(0, active_bbsz_idx)
            scores = scores.index_select(0, active_bbsz_idx)
        tokens.view(bsz, beam, -1)[:, :, step + 1] = torch.gather(cand_indices, dim=1, index=active_hypos)
        scores.view(bsz, beam, -1)[:, :, step] = torch.gather(cand_scores, dim=1, index=active_hypos)
        # decoder caches follow the surviving hypotheses (one beam: only when sentences left the batch)
        reorder_state = active_bbsz_idx if beam > 1 or batch_idxs is not None else None

    for sent in range(len(finalized)):
        order = torch.sort(torch.tensor([float(h["score"].item()) for h in finalized[sent]]), descending=True)[1]
        finalized[sent] = [finalized[sent][i] for i in order]
    return finalized


def _finalize(step, bbsz_idx, eos_scores, tokens, scores, finalized, finished, beam, src_lengths, max_len,
              opts: GenerationOptions, eos, eos_uncounted: bool = False) -> list[int]:
    """fairseq SequenceGenerator.finalize_hypos. Returns the batch positions of sentences now finished.
    `eos_uncounted`: the length that normalises the score leaves out the EOS (CTranslate2 at the length limit)."""
    tokens_clone = tokens.index_select(0, bbsz_idx)[:, 1: step + 2]  # drop the start token
    tokens_clone[:, step] = eos
    pos_scores = scores.index_select(0, bbsz_idx)[:, : step + 1]
    pos_scores[:, step] = eos_scores
    pos_scores[:, 1:] = pos_scores[:, 1:] - pos_scores[:, :-1]
    if opts.normalize_scores:
        eos_scores /= (step + 1 - eos_uncounted) ** opts.lenpen

    cum_unfin: list[int] = []
    prev = 0
    for f in finished:
        if f:
            prev += 1
        else:
            cum_unfin.append(prev)
    cum_fin = torch.tensor(cum_unfin, dtype=torch.int).to(bbsz_idx)
    unfin_idx = torch.div(bbsz_idx, beam, rounding_mode="trunc")
    sent = unfin_idx + torch.index_select(cum_fin, 0, unfin_idx)
    seen = (sent << 32) + unfin_idx
    unique_seen: list[int] = torch.unique(seen).tolist()
    if opts.match_source_len:
        too_long = step > torch.index_select(src_lengths, 0, unfin_idx)
        eos_scores = torch.where(too_long, torch.tensor(-math.inf), eos_scores)
    sent_list = sent.tolist()
    for i in range(bbsz_idx.size(0)):
        if len(finalized[sent_list[i]]) < beam:
            finalized[sent_list[i]].append({"tokens": tokens_clone[i], "score": eos_scores[i],
                                            "positional_scores": pos_scores[i]})
    newly_finished: list[int] = []
    for s in unique_seen:
        unique_sent = s >> 32
        unique_unfin = s - (unique_sent << 32)
        if not finished[unique_sent] and (len(finalized[unique_sent]) == beam or step == max_len):
            finished[unique_sent] = True
            newly_finished.append(unique_unfin)
    return newly_finished
