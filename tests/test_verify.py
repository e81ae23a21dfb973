"""fairport verify: a correct port passes; a port with one perturbed layer fails and the report names that
layer; a wrong tokenizer vocabulary fails the tokenizer check; a bad source fails with a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fairport.converters.convert import convert
from helpers import SHARED, gpt2_files, needs_ctranslate2, needs_fairseq, needs_shared, rewrite_weights, run_cli


def run_verify(*args, env=None):
    return run_cli("verify", *args, env=env)


@pytest.fixture(scope="module")
def trained_port(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "port"
    convert(trained_dir, out)
    return out


@needs_fairseq
def test_correct_port_passes_with_full_report(trained_dir, trained_port, tmp_path):
    proc = run_verify(trained_dir, trained_port, "--fairseq-data", trained_dir / "bin", "--limit", "24",
                      "--dtypes", "float32,bfloat16,int8", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "verify: PASS"
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["schema"] == "fairport.verify/3" and rep["passed"]  # /3: engines as deployed, per-engine parity
    assert rep["logits"]["reference"]["max_abs"] <= 1e-4
    assert "transformers" in rep["logits"]  # FSMT-compatible folder: the third side ran
    assert rep["generation"]["beam"]["exact_match"] == 1.0 and rep["generation"]["greedy"]["exact_match"] == 1.0
    assert rep["nll"]["target"] == "references"
    assert rep["quality"]["bleu"]["original"] == rep["quality"]["bleu"]["reference"]
    fp32, bf16, int8 = rep["precision"]
    assert (fp32["dtype"], bf16["dtype"], int8["dtype"]) == ("float32", "bfloat16", "int8")
    assert 0 < int8["logits_max_abs"] <= int8["tolerance"] and 0 <= int8["beam_exact_match"] <= 1
    assert int8["int8_weights"] == "quantized at load"  # converted without --int8
    assert "bleu_delta_vs_original" in int8
    assert fp32["beam_exact_match"] == 1.0 and fp32["score_max_abs_delta"] <= 1e-4
    assert fp32["bleu_delta_vs_original"] == 0
    assert 0 <= bf16["beam_exact_match"] <= 1 and "bleu_delta_vs_original" in bf16 and bf16["score_mean_abs_delta"] >= 0
    assert rep["speed"]["beam"]["original"]["seconds"] > 0 and rep["speed"]["beam"]["reference"]["seconds"] > 0
    assert rep["environment"]["known_deviations"]
    assert (tmp_path / "r" / "layers.png").stat().st_size > 0 and (tmp_path / "r" / "speed.png").exists()
    md = (tmp_path / "r" / "report.md").read_text()
    assert "# fairport verify: PASS" in md and "layers.png" in md


@needs_fairseq
def test_perturbed_layer_fails_and_is_named(trained_dir, trained_port, tmp_path):
    """A wrong port fails, names the layer where it diverges, and its generation mismatches are divergences:
    its logits |Δ| is beyond the logits check, so no flip is explained as a tie."""
    bad = tmp_path / "bad"
    shutil.copytree(trained_port, bad)
    key = "model.decoder.layers.1.fc2.weight"
    rewrite_weights(bad, lambda w: w[key].add_(0.05 * torch.randn(w[key].shape,
                                                                   generator=torch.Generator().manual_seed(0))))
    proc = run_verify(trained_dir, bad, "--fairseq-data", trained_dir / "bin", "--limit", "24", "--out", tmp_path / "r")
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout.splitlines()[-1]
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["layers"]["first_divergent"] == "decoder.layers.1"
    assert "decoder.layers.1" in proc.stdout  # named among the failing checks, listed last
    # its logits check failed: divergence is established, so no mismatch costs a run to explain (it fails fast)
    mismatches = [m for g in rep["generation"].values() for m in g["mismatches"]]
    assert mismatches and all(m["class"] == "not explained" and "logits check failed" in m["explanation"]
                              for m in mismatches)
    assert any(c["name"].endswith("every mismatch explained") and not c["passed"] for c in rep["checks"])


@needs_fairseq
def test_transformers_as_deployed_generates_as_fairseq(trained_dir, tmp_path):
    """transformers loaded with its defaults and generate() with the folder's generation config, on inputs that
    all run to the length limit (max_len_b 4): greedy equals fairseq's outputs; every beam difference is the named
    rule of transformers' search at the limit (its forced EOS scored 0), shown with both models' scores."""
    port = tmp_path / "port"
    convert(trained_dir, port, generation_overrides={"max_len_b": 4})
    gen = json.loads((port / "generation_config.json").read_text())
    # fairseq's max_len 4 is 4 tokens and the EOS it forces; transformers counts its decoder start token too
    assert gen["max_length"] == 6 and gen["forced_eos_token_id"] == gen["eos_token_id"] and gen["min_length"] == 2
    proc = run_verify(trained_dir, port, "--fairseq-data", trained_dir / "bin", "--limit", "40",
                      "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    hf = rep["transformers"]
    assert hf["dtype"] == "float32" and hf["load"] == "AutoModelForSeq2SeqLM.from_pretrained(folder)"
    assert hf["greedy"]["exact_match"] == 1.0
    outputs = rep["generation"]["beam"]["outputs"]
    assert any(len(o["original"]) == 5 for o in outputs)  # the limit is hit: 4 tokens and </s>
    for m in hf["beam"]["mismatches"]:
        assert m["class"] == "search rule" and any("length limit" in r for r in m["rules"]), m
        assert m["evidence"]["margin"]["transformers"] < 0 <= m["evidence"]["margin_under_its_rules"]
    assert any(c["name"] == "transformers generation (beam): every mismatch explained" and c["passed"]
               for c in rep["checks"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| transformers | PASS |" in md and "| fairport reference | PASS |" in md


@needs_fairseq
def test_an_interrupted_reverify_keeps_the_previous_report(trained_dir, trained_port, tmp_path):
    """A repeated verify that is interrupted (a fault injected in its second batch) leaves the earlier, complete
    report as it was and keeps its finished batches; --resume then finishes and replaces the report."""
    out = tmp_path / "r"
    args = (trained_dir, trained_port, "--fairseq-data", trained_dir / "bin", "--limit", "24", "--batch-size", "8",
            "--out", out)
    assert run_verify(*args).returncode == 0
    before = {n: (out / n).read_bytes() for n in ("report.json", "report.md", "layers.png", "speed.png")}
    proc = run_verify(*args, env={"FAIRPORT_TEST_FAULT": "0:1"})
    assert proc.returncode == 1 and "injected fault" in proc.stderr and "--resume" in proc.stderr
    assert {n: (out / n).read_bytes() for n in before} == before
    assert (out / "shards" / "batch-00000.pt").exists() and not (out / "shards" / "batch-00001.pt").exists()
    proc = run_verify(*args, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished batches kept" in proc.stdout and not (out / "shards").exists()
    assert json.loads((out / "report.json").read_text())["passed"]


@needs_fairseq
@needs_shared
def test_wrong_tokenizer_vocabulary_fails_tokenizer_check(fixtures_dir, converted, tmp_path):
    port = tmp_path / "port"
    shutil.copytree(converted("bart_base_mnli"), port)
    vocab = json.loads((port / "vocab.json").read_text())
    a, b = "Ġthe", "Ġand"  # swap two frequent tokens' ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (port / "vocab.json").write_text(json.dumps(vocab))
    data = tmp_path / "in.txt"
    data.write_text("the cat and the dog\nbread and butter and the rest\n")
    files = gpt2_files("bart_base_mnli")
    proc = run_verify(fixtures_dir / "bart_base_mnli", port, "--data", data, "--out", tmp_path / "r",
                      "--gpt2-encoder-json", files["encoder_json"], "--gpt2-vocab-bpe", files["vocab_bpe"])
    assert proc.returncode == 1
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    tok = [c for c in rep["checks"] if c["name"].startswith("tokenizer")]
    assert tok and not tok[0]["passed"] and tok[0]["value"] == 2


@needs_fairseq
def test_missing_or_truncated_source_is_a_clear_error(trained_dir, trained_port, tmp_path):
    proc = run_verify(tmp_path / "nope.pt", trained_port)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("fairport: error:") and "not found" in proc.stderr
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained_dir / "model.pt").read_bytes()[:5000])
    proc = run_verify(cut, trained_port)
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@needs_fairseq
@needs_shared
@pytest.mark.parametrize("name,args,note", [
    ("m2m_multilingual", ["--source-lang", "de", "--target-lang", "fr"], None),
    ("m2m_multilingual", [], "verified en-de"),  # no direction given: the model's first language pair
    ("mbart_en_ro_spm", [], None)])
def test_verify_text_on_language_tagged_models(name, args, note, fixtures_dir, converted, tmp_path):
    """verify from raw text on a many-to-many model (in a chosen direction, or its first pair) and on an mBART
    translation fine-tune: every check passes against fairseq's own task framing, the tokenizer check
    included; mBART's report lists the installed fairseq's task bug among the known deviations."""
    data = tmp_path / "in.txt"
    data.write_text("".join(s + "\n" for s in (SHARED / "text" / "en.txt").read_text().splitlines()
                            if len(s) < 60)[:2000])
    proc = run_verify(fixtures_dir / name, converted(name), "--data", data, "--limit", "6", "--out", tmp_path / "r",
                      *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["passed"] and any(c["name"].startswith("tokenizer") and c["passed"] for c in rep["checks"])
    assert not note or any(note in n for n in rep["notes"])
    deviations = rep["environment"]["known_deviations"]
    assert any("#3169" in d for d in deviations) == (name == "mbart_en_ro_spm")


@needs_fairseq
@pytest.mark.parametrize("name,args", [("m2m_multilingual", ["--source-lang", "de", "--target-lang", "fr"]),
                                       ("mbart_en_ro_spm", [])])
def test_verify_random_ids_framed_as_the_task_frames_them(name, args, fixtures_dir, converted, tmp_path):
    """Without text, the ids get the task's dataset framing (language token or suffix, the target's EOS) on
    both sides; generation and logits then agree with fairseq's own task."""
    proc = run_verify(fixtures_dir / name, converted(name), "--limit", "6", "--out", tmp_path / "r", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["passed"] and rep["generation"]["beam"]["exact_match"] == 1.0


@needs_fairseq
def test_an_exact_tie_is_a_near_tie_with_margin_zero_and_passes(fixtures_dir, tmp_path):
    """Two output rows made identical in the original, so two tokens score exactly the same wherever one is
    chosen; the port breaks that tie the other way (its row moved by EPS along the decoder state at that step).
    With the defaults, verify passes and reports the mismatch as a near-tie whose original margin is 0.

    EPS must be well above the float32 resolution of the scores compared: a search score near -8 moves in steps
    of 2**-20 (9.5e-7), so an earlier construction with 1e-6 was one step, and on some machines rounded away at the
    first tie; the port then broke a later tie (the step verify reported was right, the construction was not).
    1e-5 is ~10 such steps, and still a near-tie: it moves the port's logits by about EPS, within the logits check,
    and the tie tolerance (4 x the measured logits |Δ| x tokens) grows with it."""
    eps = 1e-5
    import torch

    from fairport.reference import load
    from fairport.reference.batching import pad_batch
    from fairport.reference.hub import length_sorted_batches
    from fairport.validation.original.protocol import Generate, Original
    from fairport.validation.verify.inputs import random_inputs

    name = "iwslt_legacy_2019"  # its output projection is its own (untied): one row changes nothing else
    convert(fixtures_dir / name, tmp_path / "before")
    model = load(tmp_path / "before")
    c = model.config
    inputs = random_inputs(c.src_vocab_size, c.tgt_vocab_size, 100, 0, c.eos)  # verify's default inputs
    batches = length_sorted_batches([len(s) for s in inputs.src], 16)
    seen: dict = {}
    for idx in batches:
        src = pad_batch([inputs.src[j] for j in idx], c.pad, left=True)
        for beam in (1, 5):
            for j, h in zip(idx, model.generate(src, beam=beam)):
                for tok in set(h[0]["tokens"].tolist()):
                    seen.setdefault(tok, set()).add((beam, j))
    # a: a token the outputs of one input only use (its greedy output among them); b: a token no output uses
    a = next(t for t, uses in sorted(seen.items()) if t >= 4 and len({j for _, j in uses}) == 1
             and (1, next(iter(uses))[1]) in uses)
    b = next(t for t in range(4, c.tgt_vocab_size) if t not in seen)
    [i] = {j for _, j in seen[a]}
    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / name, src)
    state = torch.load(src / "model.pt", weights_only=False)  # a fixture we built: a trusted file
    state["model"]["decoder.embed_out"][b] = state["model"]["decoder.embed_out"][a]
    torch.save(state, src / "model.pt", _use_new_zipfile_serialization=False)
    convert(src, tmp_path / "port")
    batch = next(idx for idx in batches if i in idx)
    with Original([src / "model.pt"], src) as fairseq:
        theirs = fairseq(Generate(pad_batch([inputs.src[j] for j in batch], c.pad, left=True), {"beam": 1}))
    theirs = theirs.hypotheses[batch.index(i)][0]["tokens"].tolist()
    t = next(k for k, tok in enumerate(theirs) if tok in (a, b))
    chosen, other = theirs[t], ({a, b} - {theirs[t]}).pop()
    port = load(tmp_path / "port", pack=False)
    with torch.no_grad():  # the decoder state where the original chose: move the other row EPS up along it
        h = port.decoder.features(torch.tensor([[c.eos] + theirs[:t]]), port.encoder(torch.tensor([inputs.src[i]])))
    h = h[0, -1]
    key = "model.decoder.output_projection.weight"
    rewrite_weights(tmp_path / "port", lambda w: w[key][other].copy_(w[key][chosen] + eps * h / h.dot(h)))

    proc = run_verify(src, tmp_path / "port", "--out", tmp_path / "r")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("verify: PASS"), proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    [m] = rep["generation"]["greedy"]["mismatches"]
    assert m["input"] == i and m["class"] == "near-tie" and m["evidence"]["step"] == t
    assert m["evidence"]["margin"]["original"] == 0.0 and 0 < m["evidence"]["margin"]["port"] < 2 * eps
    assert m["evidence"]["flip"] <= m["evidence"]["tolerance"]
    assert all(x["class"] == "near-tie" for g in rep["generation"].values() for x in g["mismatches"])
    assert "near-tie" in (tmp_path / "r" / "report.md").read_text()


@needs_fairseq
def test_a_batch_dependent_original_is_recognised(trained_dir, tmp_path):
    """By construction: fairseq's max length grows with the padded width of the batch (max_len_a * width +
    max_len_b), so a short input batched with long ones may generate longer than it does alone. A port that
    ran that input alone gives the original's alone output: verify classifies the mismatch as a batch-dependent
    original, with the original's alone output as evidence."""
    import torch

    from fairport.distributed import Ranks
    from fairport.reference.folder import ModelFolder
    from fairport.validation.verify.batch import top
    from fairport.validation.verify.checks import generation, logits
    from fairport.validation.verify.report import Report
    from fairport.validation.verify.run import VerifyOptions, VerifyRun, run_batches
    from fairport.validation.verify.setup import open_setup

    port = tmp_path / "port"
    convert(trained_dir, port, generation_overrides={"max_len_a": 0.5, "max_len_b": 0})
    opts = VerifyOptions(fairseq_data=trained_dir / "bin", limit=60, batch_size=64, out=tmp_path / "r", progress=False)
    report = Report()
    run = VerifyRun(open_setup(trained_dir, ModelFolder.open(port), opts, Ranks(), "cpu", report), report)
    s = run.setup
    try:
        run_batches(run)
        logits.report(run)
        [batch] = s.batches  # every input in one batch: its width is the longest input's
        # a short input: alone its max length (half its own length) may cut it short, in the batch not. Which
        # short input shows it depends on what the training run learnt, so take the shortest one that does.
        ports = run.results[0].checks["generation"].top["greedy"]

        def alone_differs(j):
            alone = s.port.generate(torch.tensor([s.inputs.src[j]]), **s.settings["greedy"])
            return alone if alone[0][0]["tokens"].tolist() != ports[batch.index(j)]["tokens"] else None

        short = sorted((j for j in batch if len(s.inputs.src[j]) <= 12), key=lambda j: len(s.inputs.src[j]))
        i, alone = next(((j, a) for j in short if (a := alone_differs(j)) is not None), (None, None))
        assert i is not None, "the construction needs a batch-dependent input"
        ports[batch.index(i)] = top(alone[0])  # the port, batched otherwise
        generation.report(run)
    finally:
        run.close()
    [m] = run.report.sections["generation"]["greedy"]["mismatches"]
    assert m["input"] == i and m["class"] == "batch-dependent original"
    assert m["evidence"]["original_alone"] == m["port"] != m["original"]
    assert "run alone, the original gives the port's output" in m["explanation"]


@needs_fairseq
@needs_ctranslate2
def test_verify_checks_ctranslate2s_conversion_too(trained_dir, trained_port, tmp_path):
    """--sides ctranslate2: CTranslate2's own conversion of the checkpoint, decoded and scored on the same inputs
    as the original: its teacher-forced log-probs and its outputs are checked like the port's."""
    proc = run_verify(trained_dir, trained_port, "--fairseq-data", trained_dir / "bin", "--limit", "24",
                      "--sides", "reference,ctranslate2", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    ct2 = rep["ctranslate2"]
    assert 0 < ct2["log_probs"]["max_abs"] <= 2e-4 and ct2["log_probs"]["values"] > 0
    for key in ("greedy", "beam"):
        assert ct2[key]["exact_match"] == 1.0 and ct2[key]["sentences_per_s"] > 0
    names = [c["name"] for c in rep["checks"]]
    assert "ctranslate2: teacher-forced log-probs vs original" in names
    assert "ctranslate2 generation (beam): every mismatch explained" in names
    assert (tmp_path / "r" / "ctranslate2" / "model.bin").exists()


@needs_fairseq
@needs_ctranslate2
def test_ctranslate2_search_rule_under_cnn_dm_options(trained_dir, tmp_path):
    """CNN/DM-style search options (lenpen 2, min_len above the model's natural length, no-repeat-ngram 3):
    CTranslate2 masks banned tokens before the softmax, fairseq after it, so their beams rank hypotheses
    otherwise. Each CTranslate2 mismatch is explained only when fairseq's search on the port, run alone with that
    rule changed, returns CTranslate2's output or ranks it tied with its first (none is left a divergence).
    min_len 12 forces every output well past where this model would stop, so the renormalised EOS mass is large
    and the rule shows on any trained fixture."""
    from fairport.validation.verify.mismatch import BANS_RENORMALISED, SEARCH_RULE

    port = tmp_path / "port"
    convert(trained_dir, port, generation_overrides={"beam": 4, "lenpen": 2.0, "min_len": 12, "max_len_b": 40,
                                                     "no_repeat_ngram_size": 3})
    proc = run_verify(trained_dir, port, "--fairseq-data", trained_dir / "bin", "--limit", "24", "--dtypes",
                      "float32", "--sides", "reference,ctranslate2", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    beam = json.loads((tmp_path / "r" / "report.json").read_text())["ctranslate2"]["beam"]
    assert beam["counts"]["search rule"] > 0 and not beam["counts"]["divergence"], beam["counts"]
    for m in beam["mismatches"]:
        if m["class"] == SEARCH_RULE:
            ev = m["evidence"]
            assert m["rules"] == [BANS_RENORMALISED]
            # the emulated search returns CTranslate2's output, or ranks it tied with its first
            assert ev["under_its_rule"] == m["ctranslate2"] or 0 <= ev["tie_under_its_rule"] <= ev["tolerance"]


@needs_fairseq
@needs_ctranslate2
def test_ctranslate2_on_an_mbart_translation_task(fixtures_dir, converted, tmp_path):
    """A task whose generator starts from and ends with a language token ([ro_RO]) and whose source ends with
    one ([en_XX]): CTranslate2's conversion, its config set for that framing as its users must set it, is
    checked like the other engines (no skip): every mismatch explained, none a divergence."""
    name = "mbart_en_ro_args"  # legacy args: what CTranslate2's fairseq converter reads
    proc = run_verify(fixtures_dir / name, converted(name), "--limit", "12", "--sides", "reference,ctranslate2",
                      "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    ct2 = rep["ctranslate2"]
    assert ct2["log_probs"]["max_abs"] <= 2e-4 and ct2["greedy"]["exact_match"] == 1.0
    for key in ("greedy", "beam"):
        assert not ct2[key]["counts"]["divergence"] and not ct2[key]["counts"]["not explained"]
    assert any("decoder start and end token [ro_RO]" in n for n in rep["notes"])
