"""The Numba passes of the CPU's bf16 attention (mixed_attention.py) outside its MKL products: each reads its
data once and writes its bf16 bits in the same pass, a row at a time while the row is in L1.

  split_heads      the packed float32 (B, T, parts*C) qkv (or dO) -> contiguous head-major bf16 (parts, B, NH, T,
                   HS): the products' operands at unit row stride HS, not head views of row stride 3C
  softmax_bits     forward, per row: row max, exp(s - max) (float32), row sum, the bf16 bits of the normalised
                   probabilities, the log-sum-exp
  grad_bits        backward, per row: P = exp(s - lse), dS = P (dP - rowsum(P dP)), the bits of P and of dS

exp32 is a branch-free float32 exp that LLVM vectorises (8 lanes of AVX2): Numba's math.exp in a loop is a
call to libm per value. On this project's 2-core AMD EPYC (AVX2), one thread, 393k values: exp32 0.68 ns a
value, NumPy's SIMD np.exp 1.35, math.exp in a Numba loop 3.1. Max error against float64 exp: 8e-8 relative
(NumPy's float32 exp: 1.9e-7) -- so fusing the exp into the row passes costs no accuracy; its bits differ
from np.exp's in the last place for some values, so a fused pass is tested against the same passes run one
after the other with exp32 (bitwise), and the kernel against float64 attention (tests/test_cpu_bf16.py).
"""
import numpy as np
from numba import njit

from .attention import grad_row
from .rows import row_max

_LO, _HI = np.float32(-88.0), np.float32(88.0)    # exp(-88) underflows to 0 here (float32: 6e-39, subnormal)
_LOG2E, _HALF, _INF = np.float32(1.4426950408889634), np.float32(0.5), np.float32(np.inf)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)   # ln 2 = HI + LO, HI exact in 9 bits
# exp(r) on |r| <= ln(2)/2 by its Taylor polynomial of degree 7: truncation error below r^8/8! = 5e-9
_C7, _C6, _C5, _C4 = np.float32(1 / 5040), np.float32(1 / 720), np.float32(1 / 120), np.float32(1 / 24)
_C3, _C2, _ONE = np.float32(1 / 6), np.float32(0.5), np.float32(1.0)


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def exp32(v):
    """exp(v) of a float32 (float32), branch-free: v = n ln2 + r, exp(v) = 2^n exp(r). v < -88: 0 (-inf: 0);
    v > 88: inf (exact exp overflows at 88.72; the attention passes only see v <= 0); NaN: NaN."""
    t = v if v > _LO else _LO      # NaN -> _LO here, restored below; the exponent n stays in [-127, 127]
    t = t if t < _HI else _HI
    n = np.floor(t * _LOG2E + _HALF)
    r = (t - n * _LN2_HI) - n * _LN2_LO
    p = ((((((_C7 * r + _C6) * r + _C5) * r + _C4) * r + _C3) * r + _C2) * r + _ONE) * r + _ONE
    y = p * np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)   # n = -127: 0
    return y if v <= _HI else v * _INF


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def exp_into(x, y):
    """y = exp32(x), both float32 1-D of one length (the tests' reference for the fused passes)."""
    for i in range(x.shape[0]):
        y[i] = exp32(x[i])


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def row_sum(row, n):
    """sum(row[:n]) in float32, eight independent chains (one AVX2 vector) added pairwise at the end."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0)
    j = 0
    while j + 8 <= n:
        s0, s1, s2, s3 = s0 + row[j], s1 + row[j + 1], s2 + row[j + 2], s3 + row[j + 3]
        s4, s5, s6, s7 = s4 + row[j + 4], s5 + row[j + 5], s6 + row[j + 6], s7 + row[j + 7]
        j += 8
    for jj in range(j, n):
        s0 += row[jj]
    return ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def bf16_bits(x):
    """The bf16 bits (uint16) of a float32: mixed.bits' rounding (to nearest even, NaN kept a quiet NaN) on one
    value, for loops that convert as they go rather than through a slice (a slice per 64 values cost twice
    the conversion itself in split_heads)."""
    u = np.float32(x).view(np.uint32)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def split_heads(x, out, b0, b1):
    """out[p, b, h, t] = bf16 bits of x[b, t, (p NH + h) HS : (p NH + h + 1) HS] for batch entries [b0, b1):
    x (B, T, P*NH*HS) float32 C-contiguous, out (P, B, NH, T, HS) uint16 C-contiguous."""
    P, _, NH, T, HS = out.shape
    for b in range(b0, b1):
        for t in range(T):
            src = x[b, t]
            for p in range(P):
                for h in range(NH):
                    c = (p * NH + h) * HS
                    dst = out[p, b, h, t]
                    for j in range(HS):
                        dst[j] = bf16_bits(src[c + j])


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def softmax_bits(s, e, lse, r0, first):
    """Forward row pass over rows [r0, r0 + R). s (A, R, K) float32 raw scores of those rows (C-contiguous,
    overwritten); row i sees keys j < n = min(K, r0 + i + first). e (A, R, K) uint16 = bf16 bits of the
    probabilities P = exp(s - rowmax) / rowsum (float32; 0 on the keys not seen), so that O = P V needs no
    normalising pass over the output; lse (A, TQ) float32 gets rowmax + log(rowsum) in row r0 + i."""
    A, R, K = s.shape
    for a in range(A):
        for i in range(R):
            row = s[a, i]
            n = min(K, r0 + i + first)
            mx = row_max(row, n)
            for j in range(n):
                row[j] = exp32(row[j] - mx)
            total = row_sum(row, n)
            inv = _ONE / total
            erow = e[a, i]
            for j in range(n):
                erow[j] = bf16_bits(row[j] * inv)
            for j in range(n, K):
                erow[j] = 0
            lse[a, r0 + i] = mx + np.log(total)


@njit(fastmath=False, error_model="numpy", cache=True, nogil=True)
def grad_bits(s, dp, lse, pb, dsb, r0, first):
    """Backward row pass over rows [r0, r0 + R). s, dp (A, R, K) float32: raw scores and dP = dO V^T of those
    rows (C-contiguous, overwritten with P and dS); lse (A, TQ) the forward's log-sum-exp. Row i sees keys
    j < n = min(K, r0 + i + first): P = exp(s - lse) there, 0 on the others; dS = P (dP - rowsum(P dP)) by
    attention.grad_row (the float kernel's arithmetic); pb, dsb (A, TQ, >= K) uint16 get the bf16 bits of P
    and dS in rows r0 + i, keys [0, K)."""
    A, R, K = s.shape
    for a in range(A):
        for i in range(R):
            row, drow = s[a, i], dp[a, i]
            n = min(K, r0 + i + first)
            sh = lse[a, r0 + i]
            prow, dsrow = pb[a, r0 + i], dsb[a, r0 + i]
            for j in range(n):
                x = exp32(row[j] - sh)
                row[j] = x
                prow[j] = bf16_bits(x)
            for j in range(n, K):
                row[j] = 0
                prow[j] = 0
            grad_row(row, drow, n, K)
            for j in range(K):
                dsrow[j] = bf16_bits(drow[j])
