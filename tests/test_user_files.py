"""Nothing a user owns is overwritten or deleted (issue 21; a damaged folder: test_damaged_folder.py).

fairseq-free: the model is a small checkpoint in fairseq's format written without fairseq (helpers.tiny_checkpoint),
and every refusal here happens before the original would be started. The interrupted re-verify, which needs the
original, is in test_verify.py."""

from __future__ import annotations

import os

import pytest

from fairport.errors import FairportError
from helpers import assert_one_error_line, run_cli

TOKEN = "hf_fairportTESTtoken0123456789"


@pytest.fixture(scope="module")
def made(tiny_made):
    return tiny_made


@pytest.fixture()
def folder(tiny_folder):
    return tiny_folder


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- generate ---------------------------------------------------------------------------------------------

def test_generate_refuses_an_output_that_is_its_input(folder, tmp_path):
    src = tmp_path / "news.en"
    src.write_text("w4 w5 w6\nw7 w8\n")
    before = src.read_bytes()
    assert_one_error_line(run_cli("generate", folder, "--input", src, "--output", src), "is the --input file")
    link = tmp_path / "same.en"
    os.link(src, link)  # another name for the same file
    assert_one_error_line(run_cli("generate", folder, "--input", src, "--output", link), "is the --input file")
    assert src.read_bytes() == before


def test_generate_writes_its_output_whole_or_not_at_all(folder, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("w4 w5 w6\nw7 w8\n")
    out.write_text("an earlier translation\n")
    proc = run_cli("generate", folder, "--input", src, "--output", out, "--target-lang", "fr")  # fails before output
    assert_one_error_line(proc, "not a many-to-many model")
    assert out.read_text() == "an earlier translation\n"
    proc = run_cli("generate", folder, "--input", src, "--output", out, "--quiet", "--max-len-b", "3")
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 2
    assert not [p for p in tmp_path.iterdir() if "fairport-tmp" in p.name]


# ---- verify's report folder ------------------------------------------------------------------------------------

def test_verify_refuses_a_report_folder_holding_the_users_files(made, folder, tmp_path):
    mydocs = tmp_path / "mydocs"
    mydocs.mkdir()
    (mydocs / "report.md").write_text("my own notes\n")
    (mydocs / "plan.txt").write_text("plan\n")
    proc = run_cli("verify", made / "release", folder, "--out", mydocs)
    assert_one_error_line(proc, "plan.txt", "report.md", "did not write")
    assert (mydocs / "report.md").read_text() == "my own notes\n" and (mydocs / "plan.txt").exists()


def test_a_report_fairport_wrote_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    from fairport.validation.verify.report import Report, check_report_dir, write

    out = tmp_path / "r"
    rep = Report()
    rep.add("a check", True, 0, 0)
    rep.sections = {"inputs": {"origin": "ids", "count": 1}, "logits": {}, "nll": {"target": "x"},
                    "layers": {"first_divergent": None, "batch_inputs": 1, "curve": []}, "generation": {},
                    "precision": [], "speed": {}, "environment": {"versions": {}, "device": "cpu", "processor": "",
                                                                  "machine": "", "threads": 1, "processes": 1,
                                                                  "seed": 0, "source_sha256": {},
                                                                  "known_deviations": []}}
    write(rep, out, "src.pt", "folder")
    (out / "shards").mkdir()
    (out / "shards" / "manifest.json").write_text("{}")
    check_report_dir(out)  # its own report and shards: verify may replace them
    (out / "mine.txt").write_text("x")
    with pytest.raises(FairportError, match="mine.txt"):
        check_report_dir(out)


# ---- upload and card --------------------------------------------------------------------------------------

def hub_env(url, token=TOKEN, home=None):
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": token or ""}
    if home:
        env["HF_HOME"] = str(home)
    return env


def test_a_failing_upload_leaves_the_folder_byte_for_byte(folder, tmp_path):
    assert run_cli("card", folder).returncode == 0
    before = snapshot(folder)
    # nothing listens there: the upload fails after its retries
    proc = run_cli("upload", folder, "me/folder", "--allow-unverified", env=hub_env("http://127.0.0.1:9"))
    assert_one_error_line(proc, "upload failed")
    assert snapshot(folder) == before


def test_upload_without_a_token_says_so_before_the_network(folder, tmp_path):
    from fakehub import FakeHub

    with FakeHub(TOKEN) as hub:
        proc = run_cli("upload", folder, "me/folder", "--allow-unverified", env=hub_env(hub.url, token=None,
                                                                                     home=tmp_path / "hf"))
        assert hub.log == []
    assert_one_error_line(proc, "no Hugging Face token", "HF_TOKEN", "hf auth login")


def test_a_card_the_user_edited_is_never_replaced(folder):
    from fakehub import FakeHub

    assert run_cli("card", folder).returncode == 0
    card = folder / "README.md"
    card.write_text(card.read_text() + "\nA line I added by hand.\n")
    before = snapshot(folder)
    assert_one_error_line(run_cli("card", folder), "README.md", "--force")
    with FakeHub(TOKEN) as hub:
        proc = run_cli("upload", folder, "me/folder", "--allow-unverified", env=hub_env(hub.url))
        assert_one_error_line(proc, "README.md", "--card keep", "--card replace")
        assert hub.log == []
        proc = run_cli("upload", folder, "me/folder", "--allow-unverified", "--card", "keep", env=hub_env(hub.url))
        assert proc.returncode == 0, proc.stderr
        assert hub.files["me/folder"]["README.md"] == card.read_bytes()
        proc = run_cli("upload", folder, "me/folder", "--allow-unverified", "--card", "replace", env=hub_env(hub.url))
        assert proc.returncode == 0, proc.stderr
        sent = hub.files["me/folder"]["README.md"].decode()
        assert "A line I added by hand." not in sent and "UNVERIFIED PORT" in sent
    assert snapshot(folder) == before  # upload wrote nothing locally


def test_upload_sends_a_fresh_card_without_writing_one(folder):
    from fakehub import FakeHub

    before = snapshot(folder)
    with FakeHub(TOKEN) as hub:
        proc = run_cli("upload", folder, "me/folder", "--allow-unverified", env=hub_env(hub.url))
        assert proc.returncode == 0, proc.stderr
        assert "me/folder" in hub.files["me/folder"]["README.md"].decode()
    assert snapshot(folder) == before and not (folder / "README.md").exists()


def test_convert_force_keeps_a_card_the_user_edited(made, folder):
    assert run_cli("card", folder).returncode == 0
    assert run_cli("convert", made / "release", folder, "--force").returncode == 0  # its own card: replaced
    assert run_cli("card", folder).returncode == 0
    (folder / "README.md").write_text((folder / "README.md").read_text() + "mine\n")
    assert_one_error_line(run_cli("convert", made / "release", folder, "--force"), "README.md")
    assert (folder / "README.md").read_text().endswith("mine\n")


# ---- flags that would do nothing, and convert's inputs ------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["verify", "{release}", "{folder}", "--split", "valid"], ["--split", "--fairseq-data"]),
    (["verify", "{release}", "{folder}", "--exact-match", "0.9"], ["--exact-match", "--strict"]),
    (["verify", "{release}", "{folder}", "--strict", "--max-tie-rate", "0.1"], ["--max-tie-rate", "--strict"]),
    (["generate", "{folder}", "--seed", "3"], ["--seed", "--sampling"]),
    (["generate", "{folder}", "--sampling-topk", "3"], ["--sampling-topk", "--sampling"]),
    (["generate", "{folder}", "--compile", "--no-pack"], ["--no-pack", "--compile"]),
])
def test_flags_that_do_nothing_together_are_refused(args, words, made, folder):
    args = [a.format(release=made / "release", folder=folder) for a in args]
    assert_one_error_line(run_cli(*args), *words)


def test_convert_says_what_a_wrong_source_is(made, folder, tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(7, 256)) * 4)
    assert_one_error_line(run_cli("convert", noise, tmp_path / "a"), "neither a zip archive nor a pickle")
    assert_one_error_line(run_cli("convert", folder / "model.safetensors", tmp_path / "b"), "safetensors file")
    assert_one_error_line(run_cli("convert", folder, tmp_path / "c"), "fairport model folder", "already converted")
    text = tmp_path / "notes.pt"
    text.write_text("some notes\n")
    assert_one_error_line(run_cli("convert", text, tmp_path / "d"), "text file")


def test_an_ids_only_folder_says_so_briefly(made, tmp_path):
    assert run_cli("convert", made / "release", tmp_path / "ids", "--bpe", "none").returncode == 0
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    line = assert_one_error_line(run_cli("generate", tmp_path / "ids", "--input", src), "token ids only")
    assert len(line) < 250 + len(str(tmp_path))


def test_the_demo_finds_the_shared_data_where_the_tests_do():
    from fairport.demo import shared_data
    from helpers import SHARED

    if not (SHARED / "gpt2" / "encoder.json").exists():
        pytest.skip(f"shared data not found at {SHARED}")
    assert shared_data() == SHARED.resolve() or shared_data() == SHARED
