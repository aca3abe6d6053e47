"""Train a small GPT on tiny Shakespeare (CPU or GPU), then print a sample of what it writes.

    python examples/train_shakespeare.py                          # the shipped text, char-level, 2000 iterations
    python examples/train_shakespeare.py --data input.txt         # another text file
    python examples/train_shakespeare.py --tokenizer bpe:512      # byte-level BPE instead of characters
    python examples/train_shakespeare.py --device cuda            # on an NVIDIA GPU (pip install -e ".[cuda]")
    python examples/train_shakespeare.py --max_iters 500 --n_layer 2   # any TrainConfig key: --help lists them
    python examples/train_shakespeare.py --init_from=resume       # continue the run in out/shakespeare_char/
    mpiexec -n 2 python examples/train_shakespeare.py --batch_size 6   # data-parallel: 2 ranks, 6 windows each

The text (examples/data/tinyshakespeare.txt unless --data says otherwise) is tokenized once into
./data/shakespeare/<tokenizer>/ (kept for later runs); the run writes its best checkpoint, its last state,
metrics.jsonl and loss.png into ./out/shakespeare_<tokenizer>/ unless --out_dir says otherwise. A resumed
run takes its data and settings from its checkpoint. Sample afterwards with examples/sample.py.
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")  # before NumPy loads: idle BLAS threads sleep after ~1.5 ms (README, Threads)
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygrad_llm import distributed  # noqa: E402
from tinygrad_llm.cli import UsageError, parse_config_args, run_cli  # noqa: E402
from tinygrad_llm.data import SHAKESPEARE_TEXT, check_tokenizer_spec, prepare  # noqa: E402
from tinygrad_llm.train import TrainConfig, check_out_dir, config_argument_parser, resume_config, train  # noqa: E402

DATA_ROOT = Path("data/shakespeare")


def prepared_dir(text_path, tokenizer):
    """Tokenize text_path into data/shakespeare/<tokenizer>/, unless that was done already from this file."""
    data_dir = DATA_ROOT / tokenizer.replace(":", "")
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == str(text_path) and meta_path.stat().st_mtime >= text_path.stat().st_mtime:
            print(f"using the tokenized data in {data_dir}")
            return data_dir
    print(f"tokenizing {text_path} ({tokenizer}) into {data_dir}")
    meta = prepare(text_path, data_dir, tokenizer=tokenizer)
    print(f"vocabulary {meta['vocab_size']}, {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return data_dir


def parser():
    p = config_argument_parser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                               defaults={"data_dir": "data/shakespeare/<tokenizer>, prepared from --data",
                                         "out_dir": "out/shakespeare_<tokenizer>"})
    p.add_argument("--data", type=Path, default=None,
                   help=f"the text to train on (default: {SHAKESPEARE_TEXT.relative_to(SHAKESPEARE_TEXT.parents[2])})")
    p.add_argument("--tokenizer", default="char", help="char, bpe:N (e.g. bpe:512) or a saved BPE tokenizer file "
                                                       "(default: char)")
    return p


def main(argv):
    given = parse_config_args(parser(), argv)
    text, tokenizer = given.pop("data"), given.pop("tokenizer")
    out_dir = given.pop("out_dir", f"out/shakespeare_{tokenizer.replace(':', '')}")
    if given.get("init_from") == "resume":
        if text is not None:
            raise UsageError("--data starts a new run; a resumed run reads the data folder it was started with")
        config = resume_config(out_dir, **given)
    else:
        check_tokenizer_spec(tokenizer)
        config = TrainConfig(out_dir=out_dir, **given)      # checks every value before any work
        check_out_dir(config)
        if "data_dir" not in given:
            text_path = (text or SHAKESPEARE_TEXT).resolve()
            if not text_path.is_file():
                raise FileNotFoundError(f"--data {text_path}: no such file")
            world = distributed.world()   # under mpiexec, rank 0 tokenizes while the others wait
            if not world.is_main:
                world.barrier()
            config.data_dir = str(prepared_dir(text_path, tokenizer))
            if world.is_main:
                world.barrier()
    summary = train(config)
    print(f"best val loss {summary['best_val_loss']:.4f} at iteration {summary['best_iter']}, "
          f"{summary['elapsed_s']:.1f} s; checkpoint {summary['checkpoint']}")


if __name__ == "__main__":
    run_cli(main)
