"""Train a small GPT on tiny Shakespeare (CPU or GPU), then print a sample of what it writes.

    python examples/train_shakespeare.py                          # downloads the text, char-level, 2000 iterations
    python examples/train_shakespeare.py --data input.txt         # your own copy of the text (offline)
    python examples/train_shakespeare.py --tokenizer bpe:512      # byte-level BPE instead of characters
    python examples/train_shakespeare.py --device cuda            # on an NVIDIA GPU (pip install -e ".[cuda]")
    python examples/train_shakespeare.py --max_iters=500 --n_layer=2 --init_from=resume   # any TrainConfig field

The text is tokenized once into ./data/shakespeare/<tokenizer>/ (kept for later runs); the run writes
its best checkpoint, metrics.jsonl and loss.png into ./out/shakespeare_<tokenizer>/ unless --out_dir=
says otherwise. Sample from the checkpoint afterwards with examples/sample.py.
"""
import argparse
import dataclasses
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinygrad_llm.data import prepare  # noqa: E402
from tinygrad_llm.fileio import atomic_write  # noqa: E402
from tinygrad_llm.train import TrainConfig, parse_overrides, train  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_ROOT = Path("data/shakespeare")


def download(path):
    """Fetch tiny Shakespeare (1.1 MB) into `path` unless it is there; exit with advice when offline."""
    if path.is_file():
        return path
    print(f"downloading tiny Shakespeare from {URL} into {path}")
    try:
        with urllib.request.urlopen(URL, timeout=30) as response:
            text = response.read()
    except (urllib.error.URLError, OSError) as e:
        sys.exit(f"error: could not download tiny Shakespeare ({e}).\n"
                 f"If this machine is offline, fetch {URL} elsewhere and run\n"
                 f"    python examples/train_shakespeare.py --data PATH/TO/input.txt")
    atomic_write(path, text)
    return path


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


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Any other --key=value sets a TrainConfig field, e.g. --max_iters=500.")
    parser.add_argument("--data", type=Path, help="a local copy of the text (skips the download)")
    parser.add_argument("--tokenizer", default="char", help="char (default) or bpe:N, e.g. bpe:512")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu (default) or cuda (needs CuPy)")
    args, overrides = parser.parse_known_args(argv)
    tag = args.tokenizer.replace(":", "")
    try:
        # validate the overrides before downloading or tokenizing anything
        config = parse_overrides(overrides, TrainConfig(out_dir=f"out/shakespeare_{tag}"))
        if args.device:
            config = dataclasses.replace(config, device=args.device)
    except ValueError as e:
        parser.error(str(e))
    text_path = args.data.resolve() if args.data else download(DATA_ROOT / "input.txt").resolve()
    if not text_path.is_file():
        sys.exit(f"error: --data {args.data}: no such file")
    data_dir = prepared_dir(text_path, args.tokenizer)
    if not any(o.startswith("--data_dir=") for o in overrides):
        config = dataclasses.replace(config, data_dir=str(data_dir))
    summary = train(config)
    print(f"best val loss {summary['best_val_loss']:.4f} at iteration {summary['best_iter']}, "
          f"{summary['elapsed_s']:.1f} s; checkpoint {summary['checkpoint']}")


if __name__ == "__main__":
    main(sys.argv[1:])
