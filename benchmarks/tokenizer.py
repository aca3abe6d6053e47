"""BPE training and encoding speed on tiny Shakespeare, beside tiktoken built from the same ranks.

    python benchmarks/tokenizer.py [path/to/text] [--repeats 7]      # default: examples/data/tinyshakespeare.txt
    python benchmarks/tokenizer.py --runs-only                        # runs of one character only

The machine is shared and noisy: every figure is the median of --repeats runs, and tiktoken runs
in the same process on the same text (for encoding, in turn with ours in each round), so the ratio
is the number to trust.

Encoding is timed two ways: cold (a new tokenizer each run, so every distinct piece is merged from
scratch, by the Numba kernel or, for comparison, the pure-Python loop) and warm (the same tokenizer
again: every piece is in its cache). The Numba kernel's first call (compiling it, or loading it from
the on-disk cache) is timed once on its own, before any encode is timed.
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiktoken  # noqa: E402

from cli_args import DEFAULT_TEXT, Parser, positive_int, require_file  # noqa: E402

from tinygrad_llm import tokenizer as tokenizer_module  # noqa: E402
from tinygrad_llm.tokenizer import (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer, _compiled_kernel,
                                    _count_pieces, _merge_batch_numba, _pair_table, train_ranks_reference)  # noqa: E402



def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_jit_first_call():
    start = time.perf_counter()
    kernel = _compiled_kernel()
    if kernel is None:
        print("Numba is not installed: cold encoding uses the pure-Python loop\n")
        return
    imported = time.perf_counter()
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256}
    _merge_batch_numba([b"ab"], ranks, _pair_table(ranks))
    done = time.perf_counter()
    how = "loaded from the disk cache" if kernel.stats.cache_hits else "compiled (no disk cache yet)"
    print(f"Numba kernel first call: import numba {imported - start:.2f} s, then {done - imported:.2f} s, {how}\n")


def interleaved_medians(fns, repeats):
    """Median seconds of each of `fns` (name -> function), timed in turn within each round, so that a
    change of load on the shared machine hits them all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cold_encode(ranks, pattern, sample, python_loop=False):
    """A first encode on a new tokenizer (empty piece cache), by the Numba kernel or the Python loop."""
    saved = tokenizer_module._NUMBA_MIN_PIECES, tokenizer_module._NUMBA_MIN_BYTES
    if python_loop:
        tokenizer_module._NUMBA_MIN_PIECES = tokenizer_module._NUMBA_MIN_BYTES = sys.maxsize
    try:
        return BPETokenizer.from_tiktoken(ranks, pattern).encode(sample)
    finally:
        tokenizer_module._NUMBA_MIN_PIECES, tokenizer_module._NUMBA_MIN_BYTES = saved


RUN_CHARS = ("e", " ", "!", "\u00e9")


def time_runs(text, pattern, repeats, size=1_000_000):
    """A run of one character is one piece of `size` characters: cold encode of each RUN_CHARS run, ours
    (Numba kernel, n log n heap merge) in turn with tiktoken, ids checked equal first. The vocabulary
    (600) is trained on the text plus runs of 2..32 of each character, so that runs merge into tokens."""
    runs = "".join(f"{char * k} " * 3 for char in RUN_CHARS for k in range(2, 33))
    tok = BPETokenizer.train(text + runs, 600, pattern=pattern)
    ref = tiktoken.Encoding("bench_runs", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks, special_tokens={})
    longest = {char: max((len(t) for t in tok.mergeable_ranks if t.strip(char.encode("utf-8")) == b""), default=0)
               for char in RUN_CHARS}
    print(f"  runs of one character (vocab 600 with runs; longest run token in bytes: {longest})")
    for char in RUN_CHARS:
        sample = char * size
        ours = cold_encode(tok.mergeable_ranks, tok.pattern, sample)
        assert ours == ref.encode(sample), f"ids of a run of {char!r} differ from tiktoken"
        seconds = interleaved_medians({"tiktoken": lambda: ref.encode(sample),
                                       "ours": lambda: cold_encode(tok.mergeable_ranks, tok.pattern, sample)}, repeats)
        mb = len(sample.encode("utf-8")) / 1e6
        print(f"  encode {size:,} x {char!r} ({mb:.1f} MB, {len(ours):,} ids): ours {seconds['ours']:.3f} s, "
              f"tiktoken {seconds['tiktoken']:.3f} s ({seconds['tiktoken'] / seconds['ours']:.2f}x tiktoken); "
              "ids identical")


def parse_args(argv=None):
    parser = Parser(__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=str(DEFAULT_TEXT), help="the text (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=7, help="runs per figure, median (default %(default)s)")
    parser.add_argument("--runs-only", action="store_true",
                        help="only the runs of one character (1 MB each), not training and text encoding")
    args = parser.parse_args(argv)
    require_file(parser, "text", args.text)
    return args


def main():
    args = parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    print(f"text: {args.text} ({mb:.2f} MB), median of {args.repeats} runs\n")
    time_jit_first_call()

    for name, pattern in (("GPT-4", GPT4_SPLIT_PATTERN), ("GPT-2", GPT2_SPLIT_PATTERN)):
        tok = BPETokenizer.train(text, 512, pattern=pattern, special_tokens=["<|endoftext|>"])
        ref = tiktoken.Encoding(f"bench_{name}", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                                special_tokens=tok.special_tokens)
        print(f"{name} pattern, vocab 512")
        time_runs(text, pattern, min(args.repeats, 3))
        if args.runs_only:
            continue
        train_s = median_seconds(lambda: BPETokenizer.train(text, 512, pattern=pattern), args.repeats)
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
            # untimed: checks the ids and fills the cache that the warm timing uses
            assert tok.encode(sample) == ref.encode(sample), "ids differ from tiktoken"
            tk_ranks, tk_pattern = ref._mergeable_ranks, ref._pat_str
            seconds = interleaved_medians({
                "tiktoken": lambda: ref.encode(sample),
                "cold, Numba kernel": lambda: cold_encode(tk_ranks, tk_pattern, sample),
                "cold, pure-Python loop": lambda: cold_encode(tk_ranks, tk_pattern, sample, python_loop=True),
                "warm cache": lambda: tok.encode(sample)}, args.repeats)
            tiktoken_s = seconds.pop("tiktoken")
            print(f"  encode {label}: ids identical to tiktoken")
            print(f"    tiktoken                     {sample_mb / tiktoken_s:6.1f} MB/s")
            for how, t in seconds.items():
                print(f"    ours, {how:22} {sample_mb / t:6.1f} MB/s  ({tiktoken_s / t:.2f}x tiktoken)")
        print()


if __name__ == "__main__":
    main()
