"""The CPU's bf16 attention kernel alone (kernels/cpu/mixed_attention.py, SelfAttentionBF16Mkl): the forward and
backward of one layer's attention at a config's shape, as the model calls it (packed (B, T, 3C) qkv), medians.

    python benchmarks/attention_bf16.py --config large
    TINYGRAD_LLM_CPU_BF16_EMULATION=1 python benchmarks/attention_bf16.py --config large --null-gemm
    python benchmarks/attention_bf16.py --config large --chunk-kib 1024,2048,4096
    python benchmarks/attention_bf16.py --config large --tree /path/to/another/checkout

--null-gemm makes every MKL bf16 GEMM call a call of libc's labs (as profile_step.py's): what is left is the
kernel's time outside its products (conversions, row passes, Python per call); the outputs are garbage then.
--chunk-kib times the kernel with mixed_attention.CHUNK_BYTES set to each value (the work items' buffer
budget), the values alternating call by call. --tree imports tinygrad_llm from another checkout (the tree
before a change, say), so that two trees can be timed one after the other by the same script.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_args import Parser, positive_int  # noqa: E402

SHAPES = {"small": (12, 64, 4, 32), "large": (64, 256, 6, 64)}   # B, T, NH, HS of train_step.py's configs


def kib_list(text):
    """An argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return values


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--config", choices=sorted(SHAPES), default="large", help="(default %(default)s)")
    parser.add_argument("--reps", type=positive_int, default=8, help="timed calls of each (default %(default)s)")
    parser.add_argument("--null-gemm", action="store_true", help="MKL's GEMM calls do nothing (default off)")
    parser.add_argument("--chunk-kib", type=kib_list, default=None,
                        help="CHUNK_BYTES values in KiB, comma-separated (default: the kernel's own)")
    parser.add_argument("--tree", default=None, help="a checkout to import tinygrad_llm from (default: this one)")
    args = parser.parse_args(argv)
    if args.tree is not None and not (Path(args.tree) / "tinygrad_llm" / "__init__.py").is_file():
        parser.error(f"--tree {args.tree}: no tinygrad_llm package there")
    return args


def null_gemm(mkl):
    import ctypes
    if mkl.missing_reason() is not None:
        sys.exit(f"attention_bf16.py: --null-gemm needs MKL: {mkl.missing_reason()}")
    real = mkl._state[0]
    address = ctypes.cast(ctypes.CDLL(None).labs, ctypes.c_void_p).value
    mkl._state = (ctypes.CFUNCTYPE(real.restype, *real.argtypes)(address), None)


def main():
    args = parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve() if args.tree else ROOT))
    import numpy as np
    from tinygrad_llm import precision
    from tinygrad_llm.kernels.cpu import mixed_attention, mkl
    from tinygrad_llm.tensor import Context
    reason = precision.unsupported_reason("bfloat16", "cpu")
    if reason is not None:
        sys.exit(f"attention_bf16.py: {reason}")
    if args.null_gemm:
        null_gemm(mkl)
    B, T, NH, HS = SHAPES[args.config]
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * NH * HS)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * HS)).astype(np.float32)
    chunks = [k << 10 for k in args.chunk_kib] if args.chunk_kib else [mixed_attention.CHUNK_BYTES]
    times = {c: ([], []) for c in chunks}
    for rep in range(args.reps + 1):   # the first round warms up (Numba's compilation, the caches)
        for c in chunks:
            mixed_attention.CHUNK_BYTES = c
            ctx = Context((True,))
            t0 = time.perf_counter()
            mixed_attention.SelfAttentionBF16Mkl.forward(ctx, qkv, NH, causal=True, scale=HS ** -0.5)
            t1 = time.perf_counter()
            mixed_attention.SelfAttentionBF16Mkl.backward(ctx, dout)
            t2 = time.perf_counter()
            if rep:
                times[c][0].append(t1 - t0)
                times[c][1].append(t2 - t1)
    print(f"# {mixed_attention.__file__}; (B, T, NH, HS) = {(B, T, NH, HS)}, causal; "
          f"{'null GEMMs; ' if args.null_gemm else ''}load average {os.getloadavg()[0]:.2f}; medians of {args.reps}")
    print("| CHUNK_BYTES KiB | forward ms | backward ms |\n|---|---|---|")
    for c, (fwd, bwd) in times.items():
        print(f"| {c >> 10} | {statistics.median(fwd) * 1e3:.2f} | {statistics.median(bwd) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
