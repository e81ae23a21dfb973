"""fairport card / upload against a loopback Hub stand-in (tests/fakehub.py): the exact files and bytes
arrive, the card's metadata parses, a failing report blocks, a transient 5xx is retried, the token never
shows in output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fakehub import FakeHub
from helpers import needs_fairseq, run_cli

TOKEN = "hf_fairportTESTtoken0123456789"


def upload(folder, repo, hub_url, *extra, token=TOKEN):
    proc = run_cli("upload", folder, repo, *extra, env={"HF_ENDPOINT": hub_url, "HF_TOKEN": token,
                                                        "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert TOKEN not in proc.stdout + proc.stderr, "the token leaked into the output"
    return proc


def card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture()
def port(verified_port, tmp_path):
    dst = tmp_path / "port"
    shutil.copytree(verified_port, dst)
    return dst


@needs_fairseq
def test_upload_sends_exact_files_and_a_valid_card(port):
    local = {str(p.relative_to(port)): p.read_bytes() for p in port.rglob("*") if p.is_file()}
    with FakeHub(TOKEN, lfs_over=4096) as hub:
        proc = upload(port, "me/port", hub.url)
        assert proc.returncode == 0, proc.stderr
        sent = hub.files["me/port"]
    assert local == {str(p.relative_to(port)): p.read_bytes() for p in port.rglob("*") if p.is_file()}
    assert set(sent) == set(local) | {"README.md"}  # the card is built for the upload; nothing local is written
    for name, data in local.items():
        if name != "provenance.json":
            assert sent[name] == data, name
    # provenance.json is published with its local paths reduced to file names (and nothing else changed)
    published, mine = json.loads(sent["provenance.json"]), json.loads(local["provenance.json"])
    assert mine["source"]["checkpoint"].startswith("/") and "/tmp/" not in sent["provenance.json"].decode()
    assert all("/" not in path for path in published["inputs"].values())
    assert published["files"] == mine["files"] and published["source"]["sha256"] == mine["source"]["sha256"]
    assert published["source"]["checkpoint"] == Path(mine["source"]["checkpoint"]).name
    for text in (sent["README.md"], sent["verify/report.json"], sent["verify/report.md"]):
        assert "/tmp" not in text.decode() and str(Path.home()) not in text.decode(), "a local path is published"
    assert any("lfs-upload" in line for line in hub.log), "the LFS path was exercised"
    meta = card_meta(sent["README.md"].decode())
    assert meta["library_name"] == "transformers" and "fairport" in meta["tags"]
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["generation exact match vs original (beam)"] == 1.0
    assert "bleu (original fairseq)" in metrics and "bleu (this port)" in metrics
    assert hub.validated and hub.validated[0]["model-index"]
    body = sent["README.md"].decode()
    assert "## Parity with the original" in body and "verify/layers.png" in body and "sha256" in body
    assert "UNVERIFIED" not in body
    # one parity table per engine, measured in the report's run, and the transformers lines verify ran
    assert "| fairport reference | PASS |" in body and "| transformers | PASS |" in body
    assert "model = AutoModelForSeq2SeqLM.from_pretrained(\"me/port\")" in body and "verify ran these lines" in body


@needs_fairseq
def test_dry_run_sends_nothing_and_prints_files_and_card(port):
    with FakeHub(TOKEN) as hub:
        proc = upload(port, "me/port", hub.url, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert hub.log == []
    assert "model.safetensors" in proc.stdout and "--- README.md (model card) ---" in proc.stdout
    assert "model-index" in proc.stdout


@needs_fairseq
def test_failing_or_missing_report_blocks_upload(port):
    rep = json.loads((port / "verify" / "report.json").read_text())
    rep["passed"] = False
    (port / "verify" / "report.json").write_text(json.dumps(rep))
    with FakeHub(TOKEN) as hub:
        proc = upload(port, "me/port", hub.url)
        assert proc.returncode == 1 and "failing parity report" in proc.stderr
        assert hub.log == []
        shutil.rmtree(port / "verify")
        proc = upload(port, "me/port", hub.url)
        assert proc.returncode == 1 and "no parity report" in proc.stderr
        proc = upload(port, "me/port", hub.url, "--allow-unverified")
        assert proc.returncode == 0, proc.stderr
        card = hub.files["me/port"]["README.md"].decode()
    assert "UNVERIFIED PORT" in card and "unverified" in card_meta(card)["tags"]


@needs_fairseq
def test_transient_5xx_is_retried(port):
    with FakeHub(TOKEN, fail_commits=1) as hub:
        proc = upload(port, "me/port", hub.url)
        assert proc.returncode == 0, proc.stderr
        assert hub.commit_attempts == 2 and "retrying" in proc.stdout
        assert "config.json" in hub.files["me/port"]


@needs_fairseq
@pytest.mark.parametrize("deny,code", [(False, "401"), (True, "403")])
def test_auth_errors_are_one_clear_line(port, deny, code):
    with FakeHub("another-token", deny=deny) as hub:
        proc = upload(port, "me/port", hub.url)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fairport: error:") and code in lines[-1] and "HF_TOKEN" in lines[-1]


@needs_fairseq
def test_integrity_check_refuses_changed_folder(port):
    (port / "model.safetensors").write_bytes((port / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with FakeHub(TOKEN) as hub:
        proc = upload(port, "me/port", hub.url)
        assert hub.log == []
    assert proc.returncode == 1 and "integrity check" in proc.stderr and "model.safetensors" in proc.stderr


@needs_fairseq
def test_card_command_writes_readme(port):
    proc = run_cli("card", port, "--license", "mit")
    assert proc.returncode == 0, proc.stderr
    text = (port / "README.md").read_text()
    assert card_meta(text)["license"] == "mit"
    assert "## Generation defaults" in text and "## Known deviations" in text
