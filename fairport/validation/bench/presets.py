"""bench's presets: fairseq's published shapes (architecture, dictionary size, the release's search options),
built by fairseq with random weights and saved as the releases saved them (`args`, fp16 where they were).
`python -m fairport.validation.bench.presets OUT NAME ...` builds them (it imports fairseq: bench runs it in its
own process, build.preset). Their names are also `options.PRESETS` (torch-free, for the CLI; a test keeps the
two equal)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fairport.validation.original.fixtures import write_dict

PRESETS: dict[str, dict] = {
    "bart-large-cnn": dict(arch="bart_large", task="translation", dict_lines=50260, src_len=512, fp16=True,
                           flags=["-s", "source", "-t", "target"],
                           gen=dict(beam=4, lenpen=2.0, min_len=55, max_len_b=140, no_repeat_ngram_size=3)),
    "bart-base": dict(arch="bart_base", task="translation", dict_lines=50260, src_len=256,
                      flags=["-s", "source", "-t", "target"], gen=dict(beam=4, lenpen=1.0)),
    "wmt19-en-de": dict(arch="transformer_wmt_en_de_big", task="translation", dict_lines=42020, src_len=32,
                        flags=["--encoder-ffn-embed-dim", "8192", "--share-all-embeddings", "-s", "en", "-t", "de"],
                        gen=dict(beam=5, lenpen=1.0)),
    "tiny": dict(arch="transformer_iwslt_de_en", task="translation", dict_lines=1000, src_len=24,
                 flags=["-s", "en", "-t", "de", "--share-all-embeddings", "--encoder-embed-dim", "64",
                        "--encoder-ffn-embed-dim", "128", "--encoder-layers", "2", "--decoder-layers", "2",
                        "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
                        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
                 gen=dict(beam=4, lenpen=1.0)),
}


def build(name: str, out_dir: Path) -> Path:
    """fairseq builds preset `name` at its real size with random weights and saves it as model.pt with
    `args` (as the releases did), beside its dictionaries."""
    import torch
    from fairseq import options, tasks

    spec = PRESETS[name]
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [f"w{i}" for i in range(spec["dict_lines"])]
    langs = [spec["flags"][spec["flags"].index("-s") + 1], spec["flags"][spec["flags"].index("-t") + 1]]
    for lang in langs:
        write_dict(folder / f"dict.{lang}.txt", symbols)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(folder), "--task", spec["task"], "--arch", spec["arch"],
                                                *spec["flags"]])
    torch.manual_seed(0)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    weights = model.state_dict()
    if spec.get("fp16"):  # saved as fairseq's fp16 training saves its checkpoints
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    state = {"args": args, "model": weights,
             "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                    "lr_scheduler_state": {"best": None}, "num_updates": 0}],
             "extra_state": {"train_iterator": {"epoch": 1}}, "last_optimizer_state": None}
    torch.save(state, folder / "model.pt")
    (folder / "preset.json").write_text(json.dumps(spec))
    return folder


if __name__ == "__main__":
    for name in sys.argv[2:]:
        print(build(name, Path(sys.argv[1])))
