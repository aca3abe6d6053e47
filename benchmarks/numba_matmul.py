"""Blocked Numba matmuls, measured against BLAS (np.matmul) on the model's shapes: why no matmul kernel
is served (benchmarks/kernels.py matmul; tests/test_kernels.py checks their results).

Three kernels: a blocked 2-D product (the Linear layers), a batched product (attention's per-head
products), and a 2-D product with a fused bias + tanh-GELU epilogue (the MLP's first layer: saves one
pass over the (B*T, 4C) activations). The loops run i, k, j with j innermost, so the inner loop is an
axpy over a row of b that needs no reassociated sum (fastmath stays off, results are deterministic).

np.matmul (OpenBLAS) wins every shape of both model configs by one to two orders of magnitude, the fused
epilogue and the small per-head products included: OpenBLAS packs panels and runs register-blocked
assembly micro-kernels, these loops reach a few GFLOP/s. Figures: benchmarks/RESULTS.md.
"""
import math

import numpy as np
from numba import njit


BLOCK_I, BLOCK_K, BLOCK_J = 32, 128, 256  # a (BLOCK_K, BLOCK_J) float32 panel of b is 128 KB: stays in L2


@njit(inline="always")
def _row_block_product(a, b, out, i0, i1):
    """out[i0:i1] = a[i0:i1] @ b, blocked over k and j."""
    K, N = b.shape
    for i in range(i0, i1):
        for j in range(N):
            out[i, j] = 0.0
    for k0 in range(0, K, BLOCK_K):
        k1 = min(K, k0 + BLOCK_K)
        for j0 in range(0, N, BLOCK_J):
            j1 = min(N, j0 + BLOCK_J)
            for i in range(i0, i1):
                for k in range(k0, k1):
                    aik = a[i, k]
                    for j in range(j0, j1):
                        out[i, j] += aik * b[k, j]


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def blocked_matmul(a, b, out):
    """(M,K) @ (K,N) -> out (M,N); C-contiguous inputs."""
    M = a.shape[0]
    for ib in range((M + BLOCK_I - 1) // BLOCK_I):
        _row_block_product(a, b, out, ib * BLOCK_I, min(M, (ib + 1) * BLOCK_I))


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def batched_matmul(a, b, out):
    """(NB,M,K) @ (NB,K,N) -> out (NB,M,N): one batch entry per task (small per-head products)."""
    for n in range(a.shape[0]):
        _row_block_product(a[n], b[n], out[n], 0, a.shape[1])


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def matmul_bias_gelu(a, b, bias, out):
    """out = gelu_tanh(a @ b + bias): the epilogue runs on each row block while it is in cache."""
    M, N = a.shape[0], b.shape[1]
    c = math.sqrt(2 / math.pi)
    for ib in range((M + BLOCK_I - 1) // BLOCK_I):
        i0, i1 = ib * BLOCK_I, min(M, (ib + 1) * BLOCK_I)
        _row_block_product(a, b, out, i0, i1)
        for i in range(i0, i1):
            for j in range(N):
                x = out[i, j] + bias[j]
                out[i, j] = 0.5 * x * (1 + math.tanh(c * (x + 0.044715 * x * x * x)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def check(relative_error, tolerance):
    """The three kernels against NumPy on odd shapes; the largest relative difference."""
    worst = 0.0
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        for M, K, N in [(1, 1, 1), (33, 7, 300), (65, 129, 31), (3, 260, 5)]:
            a, b, bias = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype), rng.standard_normal(N).astype(dtype)
            out = np.empty((M, N), dtype)
            blocked_matmul(a, b, out)
            errors = [relative_error(out, a @ b)]
            matmul_bias_gelu(a, b, bias, out)
            errors.append(relative_error(out, _gelu_tanh(a @ b + bias)))
            a3, b3 = rng.standard_normal((3, M, K)).astype(dtype), rng.standard_normal((3, K, N)).astype(dtype)
            out3 = np.empty((3, M, N), dtype)
            batched_matmul(a3, b3, out3)
            errors.append(relative_error(out3, a3 @ b3))
            assert max(errors) <= tolerance[np.dtype(dtype)], f"matmul {M}x{K}x{N} {np.dtype(dtype).name}: {errors}"
            worst = max(worst, *errors)
    return worst


MODEL_SHAPES = [  # (M, K, N) of the Linear layers: 4x128 (B*T = 768) and 6x384 (B*T = 16384)
    (768, 128, 384), (768, 128, 512), (768, 512, 128), (768, 128, 65),
    (16384, 384, 1152), (16384, 384, 1536), (16384, 1536, 384), (16384, 384, 65)]
BATCHED_SHAPES = [(48, 64, 32, 64), (48, 64, 64, 32), (384, 256, 64, 256), (384, 256, 256, 64)]  # (NB, M, K, N)


def benchmark(median_ms, table_row, torch):
    """float32: Numba blocked vs np.matmul (BLAS) vs torch (None: no column), forward products only."""
    rows = []
    rng = np.random.default_rng(0)
    def product_row(name, label, kernel, a_shape, b_shape, out_shape):
        a, b = rng.standard_normal(a_shape).astype(np.float32), rng.standard_normal(b_shape).astype(np.float32)
        out = np.empty(out_shape, np.float32)
        t_numba = median_ms(lambda: kernel(a, b, out), repeat=3, warmup=1)  # seconds each on the large shapes
        t_numpy = median_ms(lambda: np.matmul(a, b, out=out), repeat=5)
        t_torch = None
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            t_torch = median_ms(lambda: ta @ tb, repeat=5)
        return table_row(name, label, np.float32, t_numba, t_numpy, t_torch)

    for M, K, N in MODEL_SHAPES:
        rows.append(product_row("matmul", f"{M}x{K}x{N}", blocked_matmul, (M, K), (K, N), (M, N)))
    for NB, M, K, N in BATCHED_SHAPES:
        rows.append(product_row("batched matmul", f"{NB}x({M}x{K}x{N})", batched_matmul, (NB, M, K), (NB, K, N), (NB, M, N)))
    for M, K, N in [(768, 128, 512), (16384, 384, 1536)]:
        a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
        bias, out = rng.standard_normal(N).astype(np.float32), np.empty((M, N), np.float32)
        t_numba = median_ms(lambda: matmul_bias_gelu(a, b, bias, out), repeat=3, warmup=1)
        t_numpy = median_ms(lambda: _gelu_tanh(a @ b + bias), repeat=5)
        t_torch = None
        if torch is not None:
            ta, tb, tbias = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(bias)
            t_torch = median_ms(lambda: torch.nn.functional.gelu(torch.addmm(tbias, ta, tb), approximate="tanh"), repeat=5)
        rows.append(table_row("matmul+bias+gelu", f"{M}x{K}x{N}", np.float32, t_numba, t_numpy, t_torch))
    return rows
