"""BPE training and encoding speed on tiny Shakespeare, beside tiktoken built from the same ranks.

    python benchmarks/tokenizer.py [path/to/tinyshakespeare.txt] [--repeats 7]

The machine is shared and noisy: every figure is the median of --repeats runs, and tiktoken runs
in the same process on the same text, so the ratio is the number to trust.
"""
import argparse
import statistics
import time
from pathlib import Path

import tiktoken

from tinygrad_llm.tokenizer import (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer, _count_pieces,
                                    train_ranks_reference)

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=str(DEFAULT_TEXT))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    print(f"text: {args.text} ({mb:.2f} MB), median of {args.repeats} runs\n")

    for name, pattern in (("GPT-4", GPT4_SPLIT_PATTERN), ("GPT-2", GPT2_SPLIT_PATTERN)):
        train_s = median_seconds(lambda: BPETokenizer.train(text, 512, pattern=pattern), args.repeats)
        tok = BPETokenizer.train(text, 512, pattern=pattern, special_tokens=["<|endoftext|>"])
        ref = tiktoken.Encoding(f"bench_{name}", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                                special_tokens=tok.special_tokens)
        print(f"{name} pattern, vocab 512")
        print(f"  train                          {train_s:7.3f} s   (target <= 1 s)")

        # the readable loop that recounts every pair at each merge, on a tenth of the text
        tenth = text[:len(text) // 10]
        counts = _count_pieces(tenth, pattern, ())
        ref_s = median_seconds(lambda: train_ranks_reference(counts, 512), 1)
        fast_s = median_seconds(lambda: BPETokenizer.train(tenth, 512, pattern=pattern), args.repeats)
        print(f"  train, 1/10 of text: reference loop {ref_s:.3f} s, fast {fast_s:.3f} s ({ref_s / fast_s:.0f}x)")

        variants = {"ASCII text": text,
                    # curly apostrophes make the text non-ASCII: the `regex` split path instead of `re`
                    "non-ASCII text (' -> \u2019)": text.replace("'", "\u2019")}
        for label, sample in variants.items():
            sample_mb = len(sample.encode("utf-8")) / 1e6
            assert tok.encode(sample) == ref.encode(sample), "ids differ from tiktoken"
            tiktoken_s = median_seconds(lambda: ref.encode(sample), args.repeats)
            warm_s = median_seconds(lambda: tok.encode(sample), args.repeats)
            # a new tokenizer each run: empty piece cache, every distinct piece merged from scratch
            cold_s = median_seconds(lambda: BPETokenizer(tok.mergeable_ranks, tok.pattern).encode(sample),
                                    args.repeats)
            print(f"  encode {label}: ids identical to tiktoken")
            print(f"    tiktoken              {sample_mb / tiktoken_s:6.1f} MB/s")
            print(f"    ours, warm cache      {sample_mb / warm_s:6.1f} MB/s  ({tiktoken_s / warm_s:.2f}x tiktoken)")
            print(f"    ours, cold cache      {sample_mb / cold_s:6.1f} MB/s  ({tiktoken_s / cold_s:.2f}x tiktoken)")
        print()


if __name__ == "__main__":
    main()
