"""Our bf16 training step against PyTorch's autocast bf16 step only, in many alternating rounds: the ratio with
its spread, where train_step.py (which times the float32 steps too) can afford few rounds. Needs a CPU with bf16
units and MKL (pip install -e ".[mkl]").

    python benchmarks/cpu_bf16_step.py --config large --rounds 5 --per 2     # 6x384: 10 timed steps each
    python benchmarks/cpu_bf16_step.py --config small --rounds 4 --per 10 --settings "16,23;64,28"
    python benchmarks/cpu_bf16_step.py --config large --rounds 5 --per 2 --gemm mkl,onednn   # MKL vs oneDNN

A round runs each step for one warm-up and --per timed steps, the steps alternating, so that the host's load
changes hit both alike; printed: each round's ratio of medians and the ratio of all timed steps' medians.
--settings compares the bf16 kernels' size choices in the same process, as extra steps of ours: each
"rows,log2" is mixed_attention.MIN_ROW_BLOCK (the causal row blocks' minimum rows) and mkl.PARALLEL_MIN_FLOPS
= 2**log2 (the products split over threads), set before each of its blocks. --gemm times our step with its bf16
products in each named library (TINYGRAD_LLM_CPU_BF16_GEMM set before each block: mkl, onednn; every setting
under every library). The steps are train_step.py's (ours_training_step, torch_autocast_step on our model's
PyTorch mirror, same weights).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

from cli_args import Parser  # noqa: E402

import train_step as ts  # noqa: E402
from tinygrad_llm.kernels.cpu import bf16_gemm, dnnl, mixed_attention, mkl  # noqa: E402
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402


def parse_settings(text):
    try:
        pairs = [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item]
        if not pairs or any(len(p) != 2 or p[0] < 1 or not 0 <= p[1] < 63 for p in pairs):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--settings wants 'rows,log2;rows,log2...', got {text!r}") from None
    return pairs


def parse_gemm(text):
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names or any(n not in ("mkl", "onednn") for n in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"--gemm wants a comma list of mkl and onednn, got {text!r}")
    return names


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--config", choices=sorted(ts.CONFIGS), default="large", help="(default %(default)s)")
    parser.add_argument("--rounds", type=ts.positive_int, default=5, help="(default %(default)s)")
    parser.add_argument("--per", type=ts.positive_int, default=2, help="timed steps a block (default %(default)s)")
    parser.add_argument("--settings", type=parse_settings, default=None,
                        help="our step under each 'rows,log2' setting (default: the tree's own)")
    parser.add_argument("--gemm", type=parse_gemm, default=["mkl"],
                        help="our step with its bf16 products in each of these libraries, e.g. mkl,onednn "
                             "(default: mkl)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if "onednn" in args.gemm and dnnl.missing_reason() is not None:
        sys.exit(f"cpu_bf16_step.py: --gemm onednn needs oneDNN's bf16 matmul ({dnnl.HINT}): {dnnl.missing_reason()}")
    ts.refuse_without_bf16_units()
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = dict(ts.CONFIGS[args.config])
    B, T = spec.pop("batch_size"), spec["block_size"]
    model32 = GPT(GPTConfig(vocab_size=ts.VOCAB, **spec), rng=np.random.default_rng(0))
    model16 = GPT(GPTConfig(vocab_size=ts.VOCAB, dtype="bfloat16", **spec), rng=np.random.default_rng(0))
    ours, theirs = ts.ours_training_step(model16), ts.torch_autocast_step(ts.torch_mirror(model32))
    settings = args.settings or [(mixed_attention.MIN_ROW_BLOCK, mkl.PARALLEL_MIN_FLOPS.bit_length() - 1)]
    runs = [(lib, r, f) for lib in args.gemm for r, f in settings]
    names = [f"ours bf16 {lib} (rows {r}, split at 2^{f})" for lib, r, f in runs]
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, ts.VOCAB, (B, T)), rng.integers(0, ts.VOCAB, (B, T))) for _ in range(3)]
    times = {name: [] for name in names + ["PyTorch autocast bf16"]}
    for r in range(args.rounds):
        medians = {}
        for name in times:
            if name in names:
                os.environ[bf16_gemm.ENV], mixed_attention.MIN_ROW_BLOCK, log2 = runs[names.index(name)]
                mkl.PARALLEL_MIN_FLOPS = dnnl.PARALLEL_MIN_FLOPS = 1 << log2
                step = ours
            else:
                step = theirs
            block = []
            for i in range(1 + args.per):
                t0 = time.perf_counter()
                step(*batches[i % len(batches)])
                if i:
                    block.append(time.perf_counter() - t0)
            times[name] += block
            medians[name] = statistics.median(block)
        print(f"round {r}: " + ", ".join(f"{n} {medians[n] / medians['PyTorch autocast bf16']:.2f}x" for n in names),
              flush=True)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"# {args.config}, cores {sorted(os.sched_getaffinity(0))}, {args.rounds * args.per} timed steps each")
    print("| step | ms/step | ratio to PyTorch's |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / ms['PyTorch autocast bf16']:.2f}x |")


if __name__ == "__main__":
    main()
