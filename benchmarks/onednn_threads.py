"""Does oneDNN fight Numba's and OpenBLAS's threads in one process? A round of oneDNN matmuls, a Numba pass
and an OpenBLAS product, timed against the sum of their separate times, with oneDNN as kernels/cpu/dnnl.py runs
it (one OpenMP thread per calling thread) or, for contrast, with its own OpenMP team of threads.THREADS.
Runs oneDNN's float32 matmul (--dtype float32, any CPU with libdnnl) or its bf16 matmul (--dtype bfloat16,
a CPU with AVX-512).

    python benchmarks/onednn_threads.py --omp one
    python benchmarks/onednn_threads.py --omp team
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import Parser  # noqa: E402
from kernels import median_ms  # noqa: E402
from tinygrad_llm.kernels.cpu import dnnl, mixed, threads  # noqa: E402


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--omp", choices=("one", "team"), default="one",
                        help="oneDNN's OpenMP threads: one (dnnl.py's setting) or threads.THREADS "
                             "(default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="(default %(default)s)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    reason = dnnl.f32_reason() if args.dtype == "float32" else dnnl.missing_reason()
    if reason is not None:
        sys.exit(f"onednn_threads.py: needs oneDNN ({dnnl.HINT}): {reason}")
    if args.omp == "team":   # this thread's OpenMP count back up: oneDNN then runs a team of its own
        dnnl.api._local.omp_set = True
        dnnl.api._omp_set_num_threads(threads.THREADS)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(8 << 20).astype(np.float32)
    sq = rng.standard_normal((1024, 1024)).astype(np.float32)
    a, b = rng.standard_normal((2048, 384)).astype(np.float32), rng.standard_normal((384, 384)).astype(np.float32)
    if args.dtype == "bfloat16":
        a, b = mixed.to_bf16(a), mixed.to_bf16(b)
    out = np.empty((2048, 384), np.float32)

    def numba():
        mixed.to_bf16(x)

    def blas():
        sq @ sq

    def onednn():
        dnnl.gemm(a, b, out, parallel=False)

    def together():
        onednn()
        numba()
        onednn()
        blas()

    parts = {"Numba pass": median_ms(numba), "OpenBLAS 1024^3": median_ms(blas), "oneDNN": median_ms(onednn)}
    round_ms = median_ms(together)
    alone = parts["Numba pass"] + parts["OpenBLAS 1024^3"] + 2 * parts["oneDNN"]
    print(f"oneDNN {args.dtype}, OpenMP {args.omp}, threads {threads.THREADS}: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
          + f"; a round {round_ms:.2f} ms against {alone:.2f} ms for its parts alone: {round_ms / alone:.2f}x")


if __name__ == "__main__":
    main()
