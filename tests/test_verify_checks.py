"""verify's checks without fairseq: the original's requests answered by FakeOriginal (the reference model
loaded from the folder as converted), so these run under `pytest -m "not fairseq"` in seconds."""

from __future__ import annotations

import json
import shutil

import pytest

from fairport.validation.verify.report import write
from fairport.validation.verify.run import VerifyOptions, verify
from helpers import FakeOriginal, rewrite_weights


@pytest.fixture(scope="module")
def tiny(tiny_made):
    return tiny_made


def run_verify(root, port, out, **options):
    opts = VerifyOptions(limit=12, batch_size=4, out=out, progress=False, transformers=False, **options)
    report = verify(root / "release", port, opts, original=FakeOriginal(root / "port"))
    write(report, out, str(root / "release"), str(port))
    return report, json.loads((out / "report.json").read_text())


def test_every_check_reports_on_a_port_equal_to_its_original(tiny, tmp_path):
    """Each check of validation/verify/checks/ runs and passes: logits and NLL |Δ| 0, every module of the
    layer curve within tolerance, every output identical, the precision row, speed and environment sections."""
    report, doc = run_verify(tiny, tiny / "port", tmp_path / "r", dtypes=("float32", "bfloat16"))
    assert report.passed, [c.name for c in report.failed]
    assert doc["logits"]["reference"]["max_abs"] == 0
    assert doc["nll"]["reference"]["nll"] == doc["nll"]["original"]["nll"]
    curve = doc["layers"]["curve"]
    assert [r["module"] for r in curve][:2] == ["encoder.embed", "encoder.layers.0"] and all(r["ok"] for r in curve)
    for key in ("greedy", "beam"):
        g = doc["generation"][key]
        assert g["exact_match"] == 1.0 and len(g["outputs"]) == 12 and not g["mismatches"]
    assert [e["dtype"] for e in doc["precision"]] == ["float32", "bfloat16"]
    assert doc["speed"]["beam"]["reference"]["seconds"] > 0 and doc["inputs"]["count"] == 12
    names = [c["name"] for c in doc["checks"]]
    assert names[0] == "logits: reference vs original (fp32)" and "per-layer outputs match" in names


def test_a_changed_layer_is_named_and_fails_fast(tiny, tmp_path):
    """One decoder weight changed: the logits check fails, the layer curve names the first module that differs
    (the decoder's layer, not the encoder), and the mismatches are listed as not explained without a single
    traced run (FakeOriginal records every request it answers)."""
    port = tmp_path / "port"
    shutil.copytree(tiny / "port", port)

    def change(weights):
        name = next(k for k in weights if k.startswith("model.decoder.layers.0.fc1.weight"))
        weights[name] += 0.5

    rewrite_weights(port, change)
    opts = VerifyOptions(limit=12, batch_size=4, out=tmp_path / "r", progress=False, transformers=False)
    fake = FakeOriginal(tiny / "port")
    report = verify(tiny / "release", port, opts, original=fake)
    doc = report.sections
    assert not report.passed and doc["logits"]["reference"]["max_abs"] > 1e-2
    assert doc["layers"]["first_divergent"] == "decoder.layers.0"
    mismatches = [m for g in doc["generation"].values() for m in g["mismatches"]]
    assert mismatches and all(m["class"] == "not explained" for m in mismatches)
    # the batches' requests and the warm-up only: no original-alone run, no traced search
    assert fake.requests.count("Generate") == 1 + 2 * 3
