"""Small fairseq checkpoints made by fairseq itself, in every checkpoint format fairport reads.

Each fixture is one of fairseq's own arch presets, shrunk through the same command-line options a user
would pass, built by fairseq's task/model code, given random weights, and saved the way fairseq saved
checkpoints at some point in time (2019 `args` Namespace files with legacy names and the old
serialization, `cfg` as omegaconf objects, `cfg` as plain containers, fp16 weights, ...).

Run in its own process (it imports fairseq): `python -m fairport.validation.original.fixtures OUTDIR [NAME ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

SHRINK = ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48", "--encoder-layers", "2",
          "--encoder-attention-heads", "4", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "40",
          "--decoder-layers", "2", "--decoder-attention-heads", "4",
          "--max-source-positions", "64", "--max-target-positions", "64"]

# name -> how to build it. dicts: "joined" | "separate" | "gpt2" (BART-style dict.txt of GPT-2 ids)
FIXTURES: dict[str, dict] = {
    "wmt_big_joined": dict(arch="transformer_vaswani_wmt_en_de_big", task="translation", dicts="joined",
                           flags=SHRINK + ["--share-all-embeddings"], format="args"),
    "wmt_separate_cfg_fp16": dict(arch="transformer_wmt_en_de", task="translation", dicts="separate",
                                  flags=SHRINK, format="cfg", fp16=True),
    "iwslt_legacy_2019": dict(arch="transformer_iwslt_de_en", task="translation", dicts="separate",
                              flags=SHRINK, format="args", legacy_names=True, legacy_serialization=True,
                              meters=True),
    "t2t_prenorm_old_decoder": dict(arch="transformer_wmt_en_de_big_t2t", task="translation", dicts="joined",
                                    flags=SHRINK + ["--share-decoder-input-output-embed", "--encoder-learned-pos",
                                                    "--decoder-learned-pos", "--layernorm-embedding",
                                                    "--activation-fn", "gelu_accurate"],
                                    format="cfg_plain", decoder_version=None),
    "transformer_layers_to_keep": dict(arch="transformer", task="translation", dicts="separate",
                                       flags=SHRINK + ["--encoder-layers", "3", "--no-scale-embedding",
                                                       "--decoder-output-dim", "24"],
                                       format="args",
                                       keep={"encoder_layers_to_keep": "0,2", "decoder_layers_to_keep": "1"}),
    "transformer_no_positions": dict(arch="transformer_tiny", task="translation", dicts="joined",
                                     flags=["--no-token-positional-embeddings", "--share-all-embeddings",
                                            "--activation-fn", "gelu"], format="cfg"),
    "bart_base_mnli": dict(arch="bart_base", task="denoising", dicts="gpt2", dict_lines=None,
                           flags=SHRINK, format="args", head=("mnli", 3)),
    "mbart_cfg": dict(arch="mbart_large", task="multilingual_denoising", dicts="gpt2",
                      flags=SHRINK + ["--langs", "en_XX,ro_RO", "--add-lang-token",
                                           "--encoder-normalize-before", "--decoder-normalize-before"], format="cfg"),
    # mBART fine-tuned for translation: sentencepiece recorded in cfg.bpe, the task's [en_XX] source suffix and
    # [ro_RO] generation EOS
    "mbart_en_ro_spm": dict(arch="mbart_large", task="translation_from_pretrained_bart", dicts="spm",
                            langs=("en_XX", "ro_RO"), spm_file="sentence.bpe.model",
                            flags=SHRINK + ["--langs", "en_XX,ro_RO", "--encoder-normalize-before",
                                            "--decoder-normalize-before", "--layernorm-embedding", "--bpe",
                                            "sentencepiece", "--sentencepiece-model", "{folder}/sentence.bpe.model"],
                            format="cfg"),
    # a transformer trained with --bpe sentencepiece (legacy args); the recorded model path is the trainer's
    # and no longer exists: the model file sits beside the checkpoint under the same name
    "transformer_spm_args": dict(arch="transformer", task="translation", dicts="spm", langs=("en", "de"),
                                 spm_file="spm.model",
                                 flags=SHRINK + ["--share-all-embeddings", "--bpe", "sentencepiece",
                                                 "--sentencepiece-model", "/home/trainer/data/spm.model"],
                                 format="args"),
    # M2M-100's recipe: many-to-many translation, one fixed dictionary, a language list file, `__en__` tokens
    # (source prefix, forced first target token), pre-norm transformer, sentencepiece, legacy args
    "m2m_multilingual": dict(arch="transformer_wmt_en_de_big", task="translation_multi_simple_epoch", dicts="spm",
                             spm_file="spm.model", fixed_dictionary="model_dict.txt", lang_dict=("en", "de", "fr"),
                             flags=SHRINK + ["--share-all-embeddings", "--encoder-normalize-before",
                                             "--decoder-normalize-before", "--lang-pairs", "en-de,de-en,en-fr",
                                             "--lang-dict", "{folder}/langs.txt", "--fixed-dictionary",
                                             "{folder}/model_dict.txt", "--encoder-langtok", "src",
                                             "--decoder-langtok", "--bpe", "sentencepiece",
                                             "--sentencepiece-model", "{folder}/spm.model"],
                             format="args"),
    # mBART-50's recipe: the same task on an mBART model, `[en_XX]` tokens and <mask>, dict.{lang}.txt per
    # language, the language list in --langs, cfg format
    "mbart50_multilingual": dict(arch="mbart_large", task="translation_multi_simple_epoch", dicts="spm",
                                 spm_file="sentence.bpe.model", per_lang=("en_XX", "ro_RO", "de_DE"),
                                 flags=SHRINK + ["--langs", "en_XX,ro_RO,de_DE", "--lang-pairs",
                                                 "en_XX-ro_RO,en_XX-de_DE", "--lang-tok-style", "mbart",
                                                 "--encoder-langtok", "src", "--decoder-langtok",
                                                 "--encoder-normalize-before", "--decoder-normalize-before",
                                                 "--layernorm-embedding", "--bpe", "sentencepiece",
                                                 "--sentencepiece-model", "{folder}/sentence.bpe.model"],
                                 format="cfg"),
}
# mbart_en_ro_spm saved with legacy args, as the 2020 mBART fine-tunes were: what CTranslate2's converter reads
FIXTURES["mbart_en_ro_args"] = {**FIXTURES["mbart_en_ro_spm"], "format": "args"}


def write_dict(path: Path, symbols: list[str]) -> None:
    path.write_text("".join(f"{s} {max(1000 - i, 1)}\n" for i, s in enumerate(symbols)), encoding="utf-8")


def _gpt2_symbols(n: int | None, shared: Path | None) -> list[str]:
    """The first n lines of fairseq's GPT-2 dict.txt (all of it: n=None), or GPT-2 ids 0..n-1 without it."""
    if shared and (shared / "gpt2" / "dict.txt").exists():
        lines = (shared / "gpt2" / "dict.txt").read_text().splitlines()[:n]
        return [ln.split(" ")[0] for ln in lines]
    return [str(i) for i in range(n or 1000)]


def train_sentencepiece(path: Path, shared: Path | None, vocab_size: int = 400) -> list[str]:
    """A BPE sentencepiece model (mBART's kind) learned on the shared real sentences (synthetic words without
    them); returns its pieces without <unk>/<s>/</s>, the symbols of a fairseq dictionary for it."""
    import sentencepiece

    text = path.with_suffix(".train.txt")
    if shared and (shared / "text" / "en.txt").exists():
        lines = [ln for lang in ("en", "de", "ru") for ln in (shared / "text" / f"{lang}.txt").read_text(
            encoding="utf-8").splitlines()]
    else:
        rng = random.Random(1)
        lines = [" ".join(f"w{rng.randrange(300)}x{rng.randrange(9)}" for _ in range(12)) for _ in range(3000)]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")),
                                             vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
                                             num_threads=1, minloglevel=2, hard_vocab_limit=False)
    text.unlink()  # the trainer wrote PREFIX.model (= path) and PREFIX.vocab
    path.with_suffix(".vocab").unlink()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]


def make_data(folder: Path, spec: dict, shared: Path | None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    if spec["dicts"] == "gpt2":
        write_dict(folder / "dict.txt", _gpt2_symbols(spec.get("dict_lines", 120), shared))
        return []
    if spec["dicts"] == "spm":
        pieces = train_sentencepiece(folder / spec["spm_file"], shared)
        if spec.get("fixed_dictionary"):  # many-to-many: one dictionary and a language list, no pair flags
            write_dict(folder / spec["fixed_dictionary"], pieces)
            (folder / "langs.txt").write_text("".join(f"{lang}\n" for lang in spec["lang_dict"]))
            return []
        if spec.get("per_lang"):  # many-to-many with a dict.{lang}.txt per language
            for lang in spec["per_lang"]:
                write_dict(folder / f"dict.{lang}.txt", pieces)
            return []
        src, tgt = spec["langs"]
        for lang in (src, tgt):
            write_dict(folder / f"dict.{lang}.txt", pieces)
        return ["-s", src, "-t", tgt]
    src = [f"s{i}" for i in range(rng.randint(60, 80))] + ["shared@@", "tok@@"]
    if spec["dicts"] == "joined":
        write_dict(folder / "dict.src.txt", src)
        write_dict(folder / "dict.tgt.txt", src)
    else:
        write_dict(folder / "dict.src.txt", src)
        write_dict(folder / "dict.tgt.txt", [f"t{i}" for i in range(53)] + ["t@@"])
    return ["-s", "src", "-t", "tgt"]


def _legacy_names(sd: dict) -> dict:
    """Rewrite a state dict with the names fairseq used in 2019: fused in_proj, layer_norms.N, embed_out."""
    import torch

    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*)\.(q_proj|k_proj|v_proj)\.(weight|bias)$", k)
        if m:
            if m.group(2) == "q_proj":
                parts = [sd[f"{m.group(1)}.{p}.{m.group(3)}"] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{m.group(1)}.in_proj_{m.group(3)}"] = torch.cat(parts, 0)
            continue
        m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(self_attn_layer_norm|encoder_attn_layer_norm|"
                     r"final_layer_norm)\.(weight|bias)$", k)
        if m:
            order = (["self_attn_layer_norm", "final_layer_norm"] if m.group(1) == "encoder"
                     else ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"])
            out[f"{m.group(1)}.layers.{m.group(2)}.layer_norms.{order.index(m.group(3))}.{m.group(4)}"] = v
            continue
        if k == "decoder.output_projection.weight":
            out["decoder.embed_out"] = v
            continue
        out[k] = v
    return out


def build(name: str, out_dir: Path, shared: Path | None = None) -> Path:
    """Build fixture `name` into out_dir/name/ (checkpoint model.pt + dictionaries). Imports fairseq."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    spec = FIXTURES[name]
    folder = out_dir / name
    lang_flags = make_data(folder, spec, shared)
    parser = options.get_training_parser()
    argv = [str(folder), "--task", spec["task"], "--arch", spec["arch"], *lang_flags,
            *(f.format(folder=folder) for f in spec["flags"])]
    args = options.parse_args_and_arch(parser, argv)
    torch.manual_seed(sum(map(ord, name)))
    task = tasks.setup_task(args)
    model = task.build_model(args)
    if spec.get("head"):
        model.register_classification_head(spec["head"][0], num_classes=spec["head"][1])
    with torch.no_grad():  # random weights everywhere, layer norms and biases included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    sd = model.state_dict()
    for k, v in spec.get("keep", {}).items():
        setattr(args, k, v)
    if spec.get("legacy_names"):
        sd = _legacy_names(sd)
    if "decoder_version" in spec and spec["decoder_version"] is None:
        sd = {k: v for k, v in sd.items() if k != "decoder.version" and not k.startswith("decoder.layer_norm.")}
    if spec.get("fp16"):
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: v.clone() for k, v in sd.items()}

    state: dict = {
        "model": sd,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {"best": 3.2}, "num_updates": 10}],
        "extra_state": {"train_iterator": {"epoch": 2, "iterations_in_epoch": 0}, "val_loss": 3.2},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(8)}}, "param_groups": [{"lr": 1e-3}]},
    }
    if spec.get("meters"):
        from fairseq.logging import meters

        avg, timer = meters.AverageMeter(), meters.StopwatchMeter()
        avg.update(2.5, 3)
        state["extra_state"]["train_meters"] = {"train_loss": avg, "wall": timer}
    if spec["format"] == "args":
        state["args"] = args
    elif spec["format"] == "cfg":
        state["cfg"] = convert_namespace_to_omegaconf(args)
    else:
        state["cfg"] = OmegaConf.to_container(convert_namespace_to_omegaconf(args))
    path = folder / "model.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not spec.get("legacy_serialization"))
    (folder / "fixture.json").write_text(json.dumps({"name": name, **spec},
                                                    default=str, indent=2))
    return path


# A fixture trained briefly with fairseq-train, so hypotheses end with EOS at varied lengths: a synthetic
# translation task (reverse the sentence and rename every word), a joined dictionary, two checkpoints of
# the same run (an ensemble of two).
TRAINED = dict(arch="transformer_wmt_en_de", updates=300, flags=[
    "--encoder-embed-dim", "48", "--encoder-ffn-embed-dim", "96", "--encoder-layers", "2",
    "--encoder-attention-heads", "4", "--decoder-embed-dim", "48", "--decoder-ffn-embed-dim", "96",
    "--decoder-layers", "2", "--decoder-attention-heads", "4", "--share-all-embeddings",
    "--max-source-positions", "128", "--max-target-positions", "128"])


def _synthetic_pairs(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    src, tgt = [], []
    for _ in range(n):
        words = [rng.randrange(24) for _ in range(rng.randint(1, 14))]
        src.append(" ".join(f"s{w}" for w in words))
        tgt.append(" ".join(f"t{w % 20}" for w in reversed(words)))
    return src, tgt


# fairseq's command-line mains run in a process that ends with os._exit once main returns: on CPU, fairseq-train
# aborts now and then while the interpreter shuts down, after training and saving ("terminate called without an
# active exception", no Python frame: a native thread torn down at exit), which made its exit status -6 for a
# finished run; seen in 4 of 4 tries in one test session whose other processes kept both cores busy.
_EXIT_AFTER_MAIN = """
import os, runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (e.code is not None)
else:
    code = 0
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def trained(out_dir: Path, name: str = "trained_reverse") -> Path:
    """fairseq-preprocess + fairseq-train (CPU, about a minute). Writes out_dir/name/{model.pt, model2.pt,
    dict.en.txt, dict.de.txt, test.en, test.de, bpecodes}."""
    import shutil
    import subprocess

    folder = out_dir / name
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", 4000), ("valid", 100), ("test", 60)):
        src, tgt = _synthetic_pairs(n, rng)
        (raw / f"{split}.en").write_text("\n".join(src) + "\n")
        (raw / f"{split}.de").write_text("\n".join(tgt) + "\n")
    # fairseq's own training needs none of fairport's allocator setting (see fairport/__init__.py)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2", THP_MEM_ALLOC_ENABLE="0")

    def run(args: list[str]) -> None:
        proc = subprocess.run([sys.executable, "-c", _EXIT_AFTER_MAIN, *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")

    run(["fairseq_cli.preprocess", "--source-lang", "en", "--target-lang", "de", "--joined-dictionary",
         "--trainpref", str(raw / "train"), "--validpref", str(raw / "valid"), "--testpref", str(raw / "test"),
         "--destdir", str(folder / "bin"),
         "--workers", "1"])
    half = TRAINED["updates"] // 2
    run(["fairseq_cli.train", str(folder / "bin"), "--arch", TRAINED["arch"], *TRAINED["flags"], "-s", "en", "-t", "de",
         "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "60",
         "--max-tokens", "3000", "--max-update", str(TRAINED["updates"]), "--dropout", "0.0",
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--seed", "1",
         "--save-dir", str(folder / "ckpt"), "--save-interval-updates", str(half), "--no-epoch-checkpoints",
         "--disable-validation", "--no-progress-bar", "--log-interval", "1000", "--cpu", "--num-workers", "0"])
    shutil.copy(folder / "ckpt" / "checkpoint_last.pt", folder / "model.pt")
    shutil.copy(next((folder / "ckpt").glob(f"checkpoint_*_{half}.pt")), folder / "model2.pt")
    for side in ("en", "de"):
        shutil.copy(folder / "bin" / f"dict.{side}.txt", folder / f"dict.{side}.txt")
        shutil.copy(raw / f"test.{side}", folder / f"test.{side}")
    # fastBPE codes that rebuild every word from its characters (right to left), so the release-style
    # text pipeline (Moses + fastBPE) round-trips this vocabulary
    merges: list[str] = []
    for word in sorted({w for f in ("train.en", "train.de") for w in (raw / f).read_text().split()}):
        suffix = word[-1] + "</w>"
        for ch in reversed(word[:-1]):
            if f"{ch} {suffix}" not in merges:
                merges.append(f"{ch} {suffix}")
            suffix = ch + suffix
    (folder / "bpecodes").write_text("".join(f"{m} {1000 - i}\n" for i, m in enumerate(merges)))
    shutil.rmtree(folder / "ckpt")
    return folder


# Real architecture sizes, built by fairseq on the meta device (no memory, no weights): for shape checks.
REAL_SIZES: dict[str, dict] = {
    "bart.large": dict(arch="bart_large", task="denoising", dict_lines=50260, flags=[]),
    "wmt19.en-de": dict(arch="transformer_wmt_en_de_big", task="translation", dict_lines=42020,
                        flags=["--encoder-ffn-embed-dim", "8192", "--share-all-embeddings", "-s", "src",
                               "-t", "tgt"]),
    # M2M-100 418M: 12+12 pre-norm layers at d1024, one 128k dictionary and 100 language tokens
    "m2m100_418M": dict(arch="transformer_wmt_en_de_big", task="translation_multi_simple_epoch", dict_lines=128000,
                        langs=100, flags=["--encoder-layers", "12", "--decoder-layers", "12",
                                          "--encoder-normalize-before", "--decoder-normalize-before",
                                          "--share-all-embeddings", "--fixed-dictionary",
                                          "{folder}/model_dict.128k.txt", "--lang-dict", "{folder}/langs.txt",
                                          "--lang-pairs", "l00-l01,l01-l00", "--encoder-langtok", "src",
                                          "--decoder-langtok"]),
}


def real_size(name: str, out_dir: Path) -> Path:
    """fairseq builds the model at its real size on the meta device; writes the folder's dictionaries,
    `args.json` (the Namespace) and `shapes.json` (state-dict name -> shape, dtype)."""
    import torch
    from fairseq import options, tasks

    spec = REAL_SIZES[name]
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [f"w{i}" for i in range(spec["dict_lines"])]
    if spec.get("langs"):  # many-to-many: one fixed dictionary and a language list
        write_dict(folder / "model_dict.128k.txt", symbols)
        (folder / "langs.txt").write_text("".join(f"l{i:02d}\n" for i in range(spec["langs"])))
    for f in (["dict.txt"] if spec["task"] == "denoising" else [] if spec.get("langs") else
              ["dict.src.txt", "dict.tgt.txt"]):
        write_dict(folder / f, symbols)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(folder), "--task", spec["task"], "--arch", spec["arch"],
                                                *(f.format(folder=folder) for f in spec["flags"])])
    task = tasks.setup_task(args)
    import fairseq.models.bart.model as bart_model

    bart_model.init_bert_params = lambda module: None  # BERT init copies through the CPU; shapes only here
    with torch.device("meta"):
        model = task.build_model(args)
    shapes = {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}
    (folder / "shapes.json").write_text(json.dumps(shapes))
    (folder / "args.json").write_text(json.dumps(vars(args), default=str))
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("names", nargs="*", help=f"fixtures to build (default: all of {list(FIXTURES)})")
    p.add_argument("--shared", default=os.environ.get("FAIRPORT_SHARED_DATA"))
    p.add_argument("--real-sizes", action="store_true", help=f"build {list(REAL_SIZES)} shape listings instead")
    p.add_argument("--trained", action="store_true", help="train the small translation fixture instead")
    a = p.parse_args(argv)
    if a.trained:
        print(trained(Path(a.out)))
        return
    if a.real_sizes:
        for name in a.names or REAL_SIZES:
            print(real_size(name, Path(a.out)))
        return
    for name in a.names or FIXTURES:
        print(build(name, Path(a.out), Path(a.shared) if a.shared else None))


if __name__ == "__main__":
    sys.exit(main())
