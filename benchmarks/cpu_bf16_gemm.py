"""MKL's bf16 GEMM on this CPU for the 6x384 step's products: which operand layout, whether the weight is packed,
and how Linear's bias is best added. Needs a CPU with bf16 units and MKL (pip install -e ".[mkl]").

    python benchmarks/cpu_bf16_gemm.py --part layouts     # one thread: every layout, packed B, torch's bf16 matmul
    python benchmarks/cpu_bf16_gemm.py --part linear      # the threads of this process: plain vs packed weight,
                                                          # the bias in a pass of its own vs by blocks, dx
    python benchmarks/cpu_bf16_gemm.py --part onednn --config small   # one thread: MKL against oneDNN
    python benchmarks/cpu_bf16_gemm.py --part onednn --config large

--part layouts multiplies at one thread (half the step's 16,384 rows: one thread's share of a product split
over two): A and B each stored as read (N) or stored transposed and read so (T), B packed once by
cblas_gemm_bf16bf16f32_pack (mkl.PackedB), and torch's bf16 matmul (oneDNN) at one thread as the anchor.
--part linear times what LinearBF16Mkl does, at threads.THREADS threads: the forward with the weight as bf16 bits
or packed, the bias added by a pass over the output or by mkl.gemm's blocks of 256 KiB / 1 MiB / 4 MiB, and dx
with w^T plain or packed. --part onednn times, at one thread, the step's Linear products (forward x w, dx =
dout w^T, dw = x^T dout; rows: half of B*T, one thread's share) of --config small (4x128) or large (6x384) in
MKL (w as bits, w packed) and in oneDNN (kernels/cpu/dnnl.py: w as bits, w in the layout oneDNN picks, and the
forward with the bias added by oneDNN), with torch's bf16 matmul as the anchor; oneDNN's implementation is
named (brg:avx512_core_amx... on an AMX CPU; ref or gemm:... means a slow path). Without oneDNN's bf16 matmul
(not installed, or a CPU without AVX-512) its columns read n/a and the reason is printed. Medians of 7 after 2
warm-ups; GFLOP/s in brackets (--part onednn: GFLOP/s alone).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import Parser  # noqa: E402
from kernels import median_ms  # noqa: E402
from tinygrad_llm.kernels.cpu import dnnl, mkl, threads  # noqa: E402
from tinygrad_llm.kernels.cpu.mixed import to_bf16  # noqa: E402

SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]   # (in, out) of c_attn, attn c_proj, c_fc, mlp c_proj
ROWS = 16384                                                    # B * T of the 6x384 step


def bf16(rng, shape):
    return to_bf16(rng.standard_normal(shape).astype(np.float32))


def layouts(rng):
    import torch
    torch.set_num_threads(1)
    print("| product | M,K,N | NN | NT | TN | TT | B packed | torch bf16 |\n|---|---|---|---|---|---|---|---|")
    R = ROWS // 2
    for K, M in SHAPES:
        for name, (m, k, n) in (("fwd x w", (R, K, M)), ("dx dout w^T", (R, M, K)), ("dw x^T dout", (K, ROWS, M))):
            out, mflop = np.empty((m, n), np.float32), 2 * m * n * k / 1e6
            a, b = bf16(rng, (m, k)), bf16(rng, (k, n))
            forms_a = {"N": a, "T": np.ascontiguousarray(a.T).T}
            forms_b = {"N": b, "T": np.ascontiguousarray(b.T).T}
            rates = [mflop / median_ms(lambda: mkl.gemm(forms_a[x], forms_b[y], out, parallel=False))
                     for x, y in ("NN", "NT", "TN", "TT")]
            packed = mkl.PackedB(b)
            rates.append(mflop / median_ms(lambda: mkl.gemm(a, packed, out, parallel=False)))
            ta = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            tb = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)
            rates.append(mflop / median_ms(lambda: ta @ tb))
            print(f"| {name} | {m},{k},{n} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


def linear(rng):
    print(f"threads: {threads.THREADS}")
    print("| N,K,M | plain w + bias pass | packed w + bias pass | packed, bias blocks 256K | 1M | 4M | dx plain | "
          "dx packed |\n|---|---|---|---|---|---|---|---|")
    for K, M in SHAPES:
        x, d = bf16(rng, (ROWS, K)), bf16(rng, (ROWS, M))
        wb, bias = bf16(rng, (K, M)), rng.standard_normal(M).astype(np.float32)
        packed, packed_t = mkl.PackedB(wb), mkl.PackedB(wb.T)
        out, dx, mflop = np.empty((ROWS, M), np.float32), np.empty((ROWS, K), np.float32), 2 * ROWS * K * M / 1e6

        def then_bias(w):
            mkl.gemm(x, w, out)
            out.__iadd__(bias)

        times = [median_ms(lambda: then_bias(wb)), median_ms(lambda: then_bias(packed))]
        saved = mkl.BIAS_BLOCK_BYTES
        for block in (1 << 18, 1 << 20, 1 << 22):
            mkl.BIAS_BLOCK_BYTES = block
            times.append(median_ms(lambda: mkl.gemm(x, packed, out, bias=bias)))
        mkl.BIAS_BLOCK_BYTES = saved
        times += [median_ms(lambda: mkl.gemm(d, wb.T, dx)), median_ms(lambda: mkl.gemm(d, packed_t, dx))]
        print(f"| {ROWS},{K},{M} | " + " | ".join(f"{t:.2f} ({mflop / t:.0f})" for t in times) + " |", flush=True)


def onednn(rng, config):
    import torch
    torch.set_num_threads(1)
    C, rows = {"small": (128, 12 * 64), "large": (384, 64 * 256)}[config]
    reason = dnnl.missing_reason()
    if reason is not None:
        print(f"oneDNN's columns: n/a ({reason})")
    print(f"# {config}: one thread; GFLOP/s, medians of 7")
    print("| product | M,K,N | MKL w bits | MKL w packed | oneDNN w bits | oneDNN w packed | oneDNN packed + bias | "
          "torch bf16 | oneDNN implementation |\n|---|---|---|---|---|---|---|---|---|")
    R = rows // 2
    for K, M in [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]:
        for name, (m, k, n) in (("fwd x w", (R, K, M)), ("dx dout w^T", (R, M, K)), ("dw x^T dout", (K, rows, M))):
            out, mflop = np.empty((m, n), np.float32), 2 * m * n * k / 1e6
            if name == "dw x^T dout":    # x^T: x (rows, K) stored, read transposed, as LinearBF16Mkl does
                a, b = bf16(rng, (k, m)).T, bf16(rng, (k, n))
            else:                        # dx: w^T read in place from w (n, k) stored
                a = bf16(rng, (m, k))
                b = bf16(rng, (k, n)) if name == "fwd x w" else bf16(rng, (n, k)).T
            bias = rng.standard_normal(n).astype(np.float32)
            rates = [mflop / median_ms(lambda: mkl.gemm(a, b, out, parallel=False))]
            packed = mkl.packed_b(b)
            rates.append(mflop / median_ms(lambda: mkl.gemm(a, packed, out, parallel=False)))
            impl = "n/a"
            if reason is None:
                dpacked = dnnl.PackedB(b)
                rates.append(mflop / median_ms(lambda: dnnl.gemm(a, b, out, parallel=False)))
                rates.append(mflop / median_ms(lambda: dnnl.gemm(a, dpacked, out, parallel=False)))
                rates.append(mflop / median_ms(lambda: dnnl.gemm(a, dpacked, out, parallel=False, bias=bias)))
                impl = "; ".join(sorted({p.impl for key, p in dnnl.api._primitives.items() if key[3][-2:] == (m, k)}))
            else:
                rates += [float("nan")] * 3
            ta = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
            tb = torch.from_numpy(np.ascontiguousarray(b).view(np.int16)).view(torch.bfloat16)
            rates.append(mflop / median_ms(lambda: ta @ tb))
            print(f"| {name} | {m},{k},{n} | " + " | ".join("n/a" if r != r else f"{r:.0f}" for r in rates)
                  + f" | {impl} |", flush=True)


def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--part", choices=("layouts", "linear", "onednn"), default="linear",
                        help="(default %(default)s)")
    parser.add_argument("--config", choices=("small", "large"), default="large",
                        help="--part onednn: the step whose shapes are timed (default %(default)s)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if mkl.missing_reason() is not None:
        sys.exit(f"cpu_bf16_gemm.py: needs MKL's bf16 GEMM: {mkl.missing_reason()}")
    rng = np.random.default_rng(0)
    if args.part == "onednn":
        onednn(rng, args.config)
    else:
        layouts(rng) if args.part == "layouts" else linear(rng)


if __name__ == "__main__":
    main()
