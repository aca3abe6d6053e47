"""The 3xTF32 GEMM (tinygrad_llm/kernels/cuda/gemm_3xtf32.py) against cuBLAS on one GPU: every product of one
transformer layer's Linears (forward x w, dx = dout w^T, dw = x^T dout), time and error.

    python benchmarks/gemm_3xtf32.py                    # the 6x384 recipe's shapes (B*T = 16,384 rows, C = 384)
    python benchmarks/gemm_3xtf32.py --recipe gpt2      # GPT-2 small's (B*T = 8 x 1024 rows, C = 768)

For each product: ours (3xTF32), cuBLAS in float32 and cuBLAS in TF32, each through the project's own entry
(cublas.gemm: cuBLASLt's plan, its algorithm timed on first use as in training), timed with CUDA events over 10
back-to-back launches, median of 15 after a warm-up; the error is the largest absolute difference from the
float64 product of the same operands over the largest element of that product. Needs CuPy and a GPU.
"""
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_args import Parser  # noqa: E402

RECIPES = {"shakespeare": (16384, 384), "gpt2": (8192, 768)}   # rows (B*T), width C


def layer_products(rows, C):
    """(name, M, N, K, trans_a, trans_b) of a layer's four Linears (qkv, attention projection, MLP in, MLP out)."""
    out = []
    for name, (k_in, k_out) in (("qkv", (C, 3 * C)), ("proj", (C, C)), ("fc", (C, 4 * C)), ("fc_proj", (4 * C, C))):
        out.append((f"{name} forward", rows, k_out, k_in, False, False))
        out.append((f"{name} dx", rows, k_in, k_out, False, True))
        out.append((f"{name} dw", k_in, k_out, rows, True, False))
    return out


def timed(cp, fn, reps=10, runs=15):
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(runs):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / reps)
    return statistics.median(times)


def main(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="shakespeare")
    args = parser.parse_args(argv)
    from tinygrad_llm import backend
    if not backend.cuda_available():
        print("gemm_3xtf32.py: needs CuPy and a CUDA GPU", file=sys.stderr)
        return 2
    import cupy as cp
    from tinygrad_llm.kernels.cuda import cublas, gemm_3xtf32
    rows, C = RECIPES[args.recipe]
    rng = np.random.default_rng(0)
    print(f"{args.recipe}: {rows} rows, C = {C}; {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print("| product | M x N x K | ours ms | cuBLAS fp32 ms | ours vs fp32 | cuBLAS TF32 ms | error ours | fp32 | TF32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0, 0.0]
    for name, M, N, K, ta, tb in layer_products(rows, C):
        a = cp.asarray(rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32))
        b = cp.asarray(rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32))
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        want = (a64.T if ta else a64) @ (b64.T if tb else b64)
        scale = float(cp.abs(want).max())
        row = []
        for mode, tf32 in (("3xtf32", False), ("cublas", False), ("cublas", True)):
            gemm_3xtf32.MODE = mode
            backend.set_tf32(tf32)
            c = cp.empty((M, N), np.float32)
            run = lambda: cublas.gemm(np.float32, 1, M, N, K, a.data.ptr, a.shape[1], 0, b.data.ptr, b.shape[1], 0,
                                      c.data.ptr, N, 0, trans_a=ta, trans_b=tb)
            row.append((timed(cp, run), float(cp.abs(c - want).max()) / scale))
        backend.set_tf32(False)
        gemm_3xtf32.MODE = "3xtf32"
        for i in range(3):
            totals[i] += row[i][0]
        (t0, e0), (t1, e1), (t2, e2) = row
        print(f"| {name} | {M} x {N} x {K} | {t0:.4f} | {t1:.4f} | {t1 / t0:.2f}x | {t2:.4f} | {e0:.2e} | {e1:.2e} | "
              f"{e2:.2e} |")
    print(f"| the layer | | {totals[0]:.3f} | {totals[1]:.3f} | {totals[1] / totals[0]:.2f}x | {totals[2]:.3f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
