"""bf16 products with float32 sums on CUDA arrays (precision.py's policy): Linear and SelfAttention under
precision.autocast("bfloat16").

How bf16 is held: as CuPy uint16 arrays of the bits (rounded to nearest even), read by cuBLAS as CUDA_R_16BF;
CuPy's own bfloat16 dtype needs ml_dtypes (experimental in CuPy 14), and nothing here needs more than storage.

Where bf16 lives: only as the products' operands. The autograd's tensors (activations, gradients) stay
float32, so LayerNorm, softmax, GELU, dropout and the loss run their float32 kernels unchanged, and no
gradient is rounded before it is summed. The price is one conversion pass over each product's float32
input (x forward, dout backward, attention's Pd in forward; attention's backward pass writes its Pd and dS as
bf16 itself), except where the producer's kernel wrote the bf16 copy in its own pass and offered it
(precision.offer_copy: LayerNorm's and GELU's outputs, GELU's and DropoutAdd's input gradients with their
column sums, mixed_elementwise.py; the flash kernels' y). What a bf16 product saves for backward is its bf16
operand (x, q k v), half the bytes of the float32 input it replaces; attention keeps no (T, T) array by default
(attention.SAVE). Weights are converted once per precision.weight_copies region (precision.weight_copy).
"""
import cupy as cp
import numpy as np

from ... import precision
from . import flash_mma
from .attention import SelfAttentionCuda, _blocks, _draw_seed, save_mode
from .attention_softmax import LSE_BACKWARD_ROW, dropout_probs, softmax_backward, softmax_forward
from .columns import column_sums
from .gemm_bf16 import bf16_matmul, gemm_heads_bf16
from .linear import LinearCuda
from .runtime import HEADER, warp_rows_launch

_SOURCE = HEADER   # f32_to_bf16 (round to nearest even) is written there once

_VECTOR_SOURCE = _SOURCE + r"""
// y[i] = bf16(x[i]) for i < n: 4 floats (16 bytes) in, 8 bytes out a thread, then the tail one at a time
extern "C" __global__ void to_bf16_v(const float* __restrict__ x, unsigned short* __restrict__ y, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x, nv = n / 4;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nv; v += stride) {
        float4 a = reinterpret_cast<const float4*>(x)[v];
        uint2 o;
        o.x = (unsigned int)f32_to_bf16(a.x) | ((unsigned int)f32_to_bf16(a.y) << 16);
        o.y = (unsigned int)f32_to_bf16(a.z) | ((unsigned int)f32_to_bf16(a.w) << 16);
        reinterpret_cast<uint2*>(y)[v] = o;
    }
    for (long long i = nv * 4 + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = f32_to_bf16(x[i]);
}
"""

# attention's backward pass from lse (SAVE "lse") writing Pd and dS straight as bf16 bits: no float32 Pd and
# no conversion passes over the (B, NH, T, T) arrays
_LSE_SOURCE = _SOURCE + r"""
__device__ __forceinline__ void store(unsigned short* p, float v) { *p = f32_to_bf16(v); }
""" + LSE_BACKWARD_ROW + r"""
// s: q k^T again, dp: dO V^T (float32, (rows, TK)); pdb = bf16(Pd), dsb = bf16(dS * scale). One warp a row.
extern "C" __global__ void attention_softmax_backward_lse_bf16(
        const float* s, const float* lse, const float* dp, unsigned short* pdb, unsigned short* dsb, long long rows,
        int TQ, int TK, int offset, float scale, const unsigned long long* seed_ptr, unsigned long long seed,
        float drop_p, float drop_scale, int has_drop) {
    long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    if (has_drop) seed = dropout_seed(seed_ptr, seed);
    lse_backward_row(s, lse, dp, pdb, dsb, r, threadIdx.x & 31, TQ, TK, offset, scale, seed, drop_p, drop_scale,
                     has_drop);
}
"""
_lse_module = None


def _softmax_backward_lse_bf16(ctx, s, lse, dp, T):
    """(bf16 Pd, bf16 dS * scale), (B, NH, T, T) uint16 each, from the float32 scores s again and dPd (dp)."""
    global _lse_module
    if _lse_module is None:
        _lse_module = cp.RawModule(code=_LSE_SOURCE, options=("-std=c++17",))
    pdb, dsb = cp.empty(s.shape, dtype=np.uint16), cp.empty(s.shape, dtype=np.uint16)
    rows = s.size // T
    grid, block = warp_rows_launch(rows)
    _lse_module.get_function("attention_softmax_backward_lse_bf16")(
        grid, block, (s, lse, dp, pdb, dsb, np.int64(rows), np.int32(T), np.int32(T), np.int32(0 if ctx.causal else T),
                      np.float32(ctx.scale), ctx.seed_ptr, ctx.seed, ctx.drop_p, np.float32(ctx.drop_scale), ctx.has_drop))
    return pdb, dsb


_module = None
_to_bf16_any = cp.ElementwiseKernel("float32 x", "uint16 y", "y = f32_to_bf16(x);", "tinygrad_llm_to_bf16",
                                    preamble=_SOURCE)
_from_bf16 = cp.ElementwiseKernel("uint16 x", "float32 y", "y = __uint_as_float(((unsigned int)x) << 16);",
                                  "tinygrad_llm_from_bf16")
_BLOCK = 256


def to_bf16(x):
    """float32 CuPy array -> a uint16 array of the same shape (C-contiguous) holding bf16(x)'s bits."""
    global _module
    y = cp.empty(x.shape, dtype=np.uint16)
    if not (x.flags.c_contiguous and x.data.ptr % 16 == 0):
        return _to_bf16_any(x, y)
    if _module is None:
        _module = cp.RawModule(code=_VECTOR_SOURCE, options=("-std=c++17",))
    n = x.size
    work = n // 4 + n % 4
    blocks = max(1, min(-(-work // _BLOCK), 132 * 16))
    _module.get_function("to_bf16_v")((blocks,), (_BLOCK,), (x, y, np.int64(n)))
    return y


def from_bf16(y):
    """uint16 bf16 bits -> float32 (exact)."""
    return _from_bf16(y)


def _f32(*arrays):
    return all(a is None or a.dtype == np.float32 for a in arrays)


def _matmul(M, N, K, a, lda, b, ldb, c, ldc, trans_a=False, trans_b=False, bias=None):
    """C (M, N) float32 = op(A) op(B) (+ bias) for the bf16 CuPy arrays a, b (2-D, row strides lda, ldb):
    cuBLASLt, or where it offers nothing, CuPy on the operands widened back to float32 (the same values,
    float32 sums: slower, same answer to rounding)."""
    if all(arr.data.ptr % 256 == 0 for arr in (a, b, c)) and bf16_matmul(
            M, N, K, a.data.ptr, lda, b.data.ptr, ldb, c.data.ptr, ldc, trans_a, trans_b, bias):
        return
    wa, wb = from_bf16(a), from_bf16(b)
    out = cp.matmul(wa.T if trans_a else wa, wb.T if trans_b else wb)
    c[...] = out if bias is None else out + bias


class LinearBF16Cuda:
    """functional.Linear with bf16 operands: out = x w + b in one cuBLASLt matmul (bias in the epilogue),
    dx = dout w^T and dw = x^T dout likewise, every sum in float32, every result float32; db = sum(dout)
    in float32, summed by the pass that converts dout to bf16 (columns.column_sums), or by dout's producer
    with the copy it offered (GELU's and DropoutAdd's backward, mixed_elementwise.py). Saves the bf16 x and
    w for backward. Anything but float32 takes LinearCuda."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        ctx.reference = not (_f32(x, w, b) and w.ndim == 2 and x.ndim >= 1 and x.shape[-1] == w.shape[0]
                             and x.size > 0)
        if ctx.reference:
            return LinearCuda.forward(ctx, x, w, b)
        K, M = w.shape
        copy = precision.take_copy(x)   # LayerNorm's or GELU's output: the copy its kernel wrote (mixed_elementwise.py)
        xb = copy.reshape(-1, K) if copy is not None else to_bf16(cp.ascontiguousarray(x).reshape(-1, K))
        N = xb.shape[0]
        wb = precision.weight_copy(w, to_bf16)
        bias = None if b is None else cp.ascontiguousarray(b)
        out = cp.empty((N, M), dtype=np.float32)
        _matmul(N, M, K, xb, K, wb, M, out, M, bias=bias)
        ctx.xb, ctx.wb, ctx.x_shape, ctx.has_b = xb, wb, x.shape, b is not None
        return out.reshape(x.shape[:-1] + (M,))

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return LinearCuda.backward(ctx, dout)
        xb, wb = ctx.xb, ctx.wb
        (N, K), M = xb.shape, wb.shape[1]
        need = ctx.needs_input_grad
        # dout's bf16 copy and column sums, where its producer's kernel made them (mixed_elementwise.py)
        dob, sums = precision.take_copy(dout, sums=True)
        dout2 = cp.ascontiguousarray(dout, dtype=np.float32).reshape(N, M)
        db = None
        if ctx.has_b and need[2]:   # db = sum(dout) in float32, in the pass that converts dout
            if sums is not None:
                db = sums
            elif dob is None:
                dob = cp.empty((N, M), dtype=np.uint16)
                db = column_sums(dout2, bf16_out=dob)
            else:
                db = column_sums(dout2)
        dob = to_bf16(dout2) if dob is None else dob.reshape(N, M)
        # dx = dout w^T, dw = x^T dout (summed over every leading axis), db = sum(dout)
        dx = dw = None
        if need[0]:
            dx = cp.empty((N, K), dtype=np.float32)
            _matmul(N, K, M, dob, M, wb, M, dx, K, trans_b=True)
            dx = dx.reshape(ctx.x_shape)
        if need[1]:
            dw = cp.empty((K, M), dtype=np.float32)
            _matmul(K, M, N, xb, K, dob, M, dw, M, trans_a=True)
        return dx, dw, db


def _heads(B, NH, M, N, K, a, lda, a_s, b, ldb, b_s, c, ldc, c_s, trans_a=False, trans_b=False):
    """gemm_heads_bf16 on byte addresses a, b (bf16) and c (float32) with (batch, head) strides a_s, b_s, c_s in
    elements; without libcublas, one CuPy product per (batch, head) on widened operands (slow, same values)."""
    if not gemm_heads_bf16(B, NH, M, N, K, a, lda, *a_s, b, ldb, *b_s, c, ldc, *c_s, trans_a=trans_a, trans_b=trans_b):
        raise RuntimeError("bf16 attention needs libcublas (cublasGemmBatchedEx), which could not be loaded")


class SelfAttentionBF16Cuda:
    """functional.SelfAttention on the packed (B, T, 3C) qkv with bf16 products and float32 softmax: as
    SelfAttentionCuda (the same blocks, the same softmax passes and dropout mask), with q k v, P and dS
    rounded to bf16 for the four products (each one batched GEMM over every (batch, head) pair, float32
    sums, float32 results). Saves the bf16 qkv and, as attention.SAVE says, the rows' log-sum-exp ("lse":
    backward multiplies the same bf16 q k^T again), or the float32 P ("p"), or the float32 P and the bf16
    Pd ("p+pd"). Where flash_mma.py takes the heads (32 or 64 wide; TINYGRAD_LLM_FLASH_MMA), its tensor-core
    flash kernels do all of it instead (the same mask from the same seed), keeping the bf16 qkv, y, lse and (with
    dropout, flash_mma.keep_bits_for) the mask's bits, and offering y's bf16 copy (written beside y) to c_proj."""

    @staticmethod
    def forward(ctx, qkv, n_head, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        ctx.reference = not _f32(qkv) or dropout_p == 1
        if ctx.reference:
            return SelfAttentionCuda.forward(ctx, qkv, n_head, causal=causal, scale=scale, dropout_p=dropout_p, rng=rng)
        qkv = cp.ascontiguousarray(qkv)
        B, T, C3 = qkv.shape
        C, NH = C3 // 3, n_head
        HS = C // NH
        qb = to_bf16(qkv)
        ctx.mma = flash_mma.enabled() and flash_mma.packed_supported(qb, NH)
        if ctx.mma:
            _draw_seed(ctx, causal, scale, dropout_p, rng)
            yb = cp.empty((B, T, C), dtype=np.uint16) if precision.collecting() else None   # c_proj's operand
            ctx.keep_bits = flash_mma.keep_bits_for(qb, NH, dropout_p)   # the mask, stored for the backward
            y, ctx.lse = flash_mma.self_attention_forward(qb, NH, causal, scale, ctx.seed, dropout_p, ctx.seed_ptr,
                                                          y_bf16=yb, keep_bits=ctx.keep_bits)
            precision.offer_copy(y, yb)   # kept only where collecting(), where yb was made
            ctx.qb, ctx.y, ctx.n_head = qb, y, NH
            return y
        s = cp.empty((B, NH, T, T), dtype=np.float32)
        y = cp.empty((B, T, C), dtype=np.float32)
        q0, s0, blocks = qb.data.ptr, s.data.ptr, _blocks(T, causal)
        qs, ss, ys = (T * C3, HS), (NH * T * T, T * T), (T * C, HS)
        for r0, r1 in blocks:   # S[b, h, r0:r1, :kend] = Q[b, h, r0:r1] K[b, h, :kend]^T
            kend = r1 if causal else T
            _heads(B, NH, r1 - r0, kend, HS, q0 + r0 * C3 * 2, C3, qs, q0 + C * 2, C3, qs, s0 + r0 * T * 4, T, ss,
                   trans_b=True)
        ctx.save = save_mode()
        pd, lse = softmax_forward(ctx, s, T, T, causal, scale, dropout_p, rng, keep_p=ctx.save != "lse")
        pdb = to_bf16(pd)
        del pd
        for r0, r1 in blocks:   # Y[b, r0:r1, h] = Pd[b, h, r0:r1, :kend] V[b, h, :kend]
            kend = r1 if causal else T
            _heads(B, NH, r1 - r0, HS, kend, pdb.data.ptr + r0 * T * 2, T, ss, q0 + 2 * C * 2, C3, qs,
                   y.data.ptr + r0 * C * 4, C, ys)
        ctx.qb, ctx.n_head = qb, NH
        if ctx.save == "lse":
            ctx.lse = lse
        else:
            ctx.p, ctx.pdb = s, (pdb if ctx.save == "p+pd" else None)
        return y

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return SelfAttentionCuda.backward(ctx, dout)
        if ctx.mma:
            dout = cp.ascontiguousarray(dout, dtype=np.float32)
            return flash_mma.self_attention_backward(ctx.qb, ctx.y, ctx.lse, dout, ctx.n_head, ctx.causal, ctx.scale,
                                                     ctx.seed, ctx.drop_p, ctx.seed_ptr, keep_bits=ctx.keep_bits)
        qb, NH, causal = ctx.qb, ctx.n_head, ctx.causal
        B, T, C3 = qb.shape
        C = C3 // 3
        HS = C // NH
        dob = to_bf16(cp.ascontiguousarray(dout, dtype=np.float32))
        q0, d0 = qb.data.ptr, dob.data.ptr
        dqkv = cp.empty((B, T, C3), dtype=np.float32)
        ds = cp.empty((B, NH, T, T), dtype=np.float32)
        g0, ds0, blocks = dqkv.data.ptr, ds.data.ptr, _blocks(T, causal)
        qs, ss, ys = (T * C3, HS), (NH * T * T, T * T), (T * C, HS)

        def dv(pdb):   # causal: keys [k0, k1) are seen only by rows [k0, T), so dV of that key block sums over those
            for k0, k1 in blocks:
                first = k0 if causal else 0
                _heads(B, NH, k1 - k0, HS, T - first, pdb.data.ptr + (first * T + k0) * 2, T, ss, d0 + first * C * 2,
                       C, ys, g0 + (k0 * C3 + 2 * C) * 4, C3, qs, trans_a=True)

        def dpd():
            for r0, r1 in blocks:
                kend = r1 if causal else T
                _heads(B, NH, r1 - r0, kend, HS, d0 + r0 * C * 2, C, ys, q0 + 2 * C * 2, C3, qs, ds0 + r0 * T * 4, T,
                       ss, trans_b=True)

        # dv = Pd^T dO, dP = (dO V^T) * M, dS = P * (dP - rowsum(dP * P)) * scale, dq = dS K, dk = dS^T Q
        if ctx.save == "lse":   # the same bf16 q k^T again; one pass: S, dPd -> bf16 Pd, bf16 dS
            s = cp.empty_like(ds)
            for r0, r1 in blocks:
                kend = r1 if causal else T
                _heads(B, NH, r1 - r0, kend, HS, q0 + r0 * C3 * 2, C3, qs, q0 + C * 2, C3, qs, s.data.ptr + r0 * T * 4,
                       T, ss, trans_b=True)
            dpd()
            pdb, dsb = _softmax_backward_lse_bf16(ctx, s, ctx.lse, ds, T)
            del s, ds
            dv(pdb)
        else:                   # bf16 Pd kept, or drawn again from the float32 P into ds before dPd overwrites it
            p = ctx.p
            pdb = ctx.pdb if ctx.save == "p+pd" else to_bf16(dropout_probs(ctx, p, ds))
            dv(pdb)
            dpd()
            softmax_backward(ctx, p, ds, T, T)
            dsb = to_bf16(ds)
            del ds
        del pdb
        s0 = dsb.data.ptr
        for r0, r1 in blocks:
            kend = r1 if causal else T
            _heads(B, NH, r1 - r0, HS, kend, s0 + r0 * T * 2, T, ss, q0 + C * 2, C3, qs, g0 + r0 * C3 * 4, C3, qs)  # dQ
        for k0, k1 in blocks:
            first = k0 if causal else 0
            _heads(B, NH, k1 - k0, HS, T - first, s0 + (first * T + k0) * 2, T, ss, q0 + first * C3 * 2, C3, qs,
                   g0 + (k0 * C3 + C) * 4, C3, qs, trans_a=True)                                           # dK
        return dqkv
