"""The 6x384 step's memory-bound kernels on their own, against the bytes they must move (GPU only).

    python3 benchmarks/gpu_norm_sums.py [--rows 16384] [--repeats 50]

Times, with CUDA events (median of --repeats launches after warm-up), LayerNorm forward and backward
(kernels/cuda/layer_norm.py), the column sums of a Linear's dout (kernels/cuda/columns.py) against the
cuBLAS product with a ones vector (cublas.sum_rows_cuda, what float32 Linear uses), the bf16 conversion of
dout alone and with the column sums in the same pass (what bf16 Linear uses), and the 16-byte vector add.
A function of several launches also counts the host's time between them: the step's profile
(gpu_train.py --profile --by_op) is the figure for kernel time. Each row prints the
bytes the kernel must read and write and the rate that gives; the floor is those bytes at the card's
copy bandwidth.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_args import Parser, positive_int  # noqa: E402

import numpy as np  # noqa: E402


def median_us(fn, repeats):
    import cupy as cp
    for _ in range(3):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
    return float(np.median(times))


def main():
    parser = Parser(__doc__)
    parser.add_argument("--rows", type=positive_int, default=64 * 256, help="rows (B*T) (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=50, help="timed launches a row (default %(default)s)")
    args = parser.parse_args()
    try:
        import cupy as cp
    except ImportError:
        sys.exit("error: this benchmark needs CuPy and a CUDA GPU")
    from tinygrad_llm.kernels.cuda import columns, cublas, elementwise, layer_norm, mixed
    from tinygrad_llm.tensor import Context

    N, f4 = args.rows, 4
    rng = np.random.default_rng(0)
    rows = []

    def row(name, nbytes, fn):
        us = median_us(fn, args.repeats)
        rows.append((name, nbytes / 1e6, us, nbytes / us / 1e3))

    copy_src = cp.asarray(rng.standard_normal(N * 1536, dtype=np.float32))
    copy_dst = cp.empty_like(copy_src)
    row("device-to-device copy (N, 1536)", 2 * copy_src.nbytes, lambda: copy_dst.__setitem__(Ellipsis, copy_src))
    C = 384
    x = cp.asarray(rng.standard_normal((N, C), dtype=np.float32))
    w, b = (cp.asarray(rng.standard_normal(C, dtype=np.float32)) for _ in range(2))
    dout = cp.asarray(rng.standard_normal((N, C), dtype=np.float32))
    ctx = Context((True, True, True))
    layer_norm.LayerNormCuda.forward(ctx, x, w, b)
    row(f"LayerNorm forward ({N}, {C})", 2 * N * C * f4, lambda: layer_norm.LayerNormCuda.forward(Context((True,) * 3), x, w, b))
    row(f"LayerNorm backward ({N}, {C})", 3 * N * C * f4, lambda: layer_norm.LayerNormCuda.backward(ctx, dout))
    for M in (384, 1152, 1536):
        d = cp.asarray(rng.standard_normal((N, M), dtype=np.float32))
        bf = cp.empty((N, M), dtype=np.uint16)
        row(f"column sums ({N}, {M}), columns.column_sums", N * M * f4, lambda d=d: columns.column_sums(d))
        row(f"column sums ({N}, {M}), cuBLAS ones product", N * M * f4, lambda d=d: cublas.sum_rows_cuda(d))
        row(f"bf16 conversion ({N}, {M}), mixed.to_bf16", N * M * 6, lambda d=d: mixed.to_bf16(d))
        row(f"bf16 conversion + column sums ({N}, {M})", N * M * 6, lambda d=d, bf=bf: columns.column_sums(d, bf16_out=bf))
    y = cp.asarray(rng.standard_normal((N, C), dtype=np.float32))
    row(f"vector add ({N}, {C})", 3 * N * C * f4,
        lambda: elementwise.AddCuda.forward(Context((False, False)), x, y))
    row(f"CuPy add ({N}, {C})", 3 * N * C * f4, lambda: x + y)
    print(f"\n{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, median of {args.repeats} launches\n")
    print("| kernel | MB moved | us | GB/s |\n|---|---:|---:|---:|")
    for name, mb, us, gbs in rows:
        print(f"| {name} | {mb:.1f} | {us:.1f} | {gbs:.0f} |")


if __name__ == "__main__":
    main()
