"""GELU under precision.autocast("bfloat16") on the CPU (precision.BF16_COPY_PRODUCERS): float32 arithmetic,
the float32 kernel's (elementwise.py) to the bit, and in the same pass the bf16 copy of what it writes for
the bf16 product that reads it next: the forward's output is the MLP's c_proj operand, the backward's input
gradient is c_fc's dout. The copies are handed over through precision.offer_copy; mixed.operand takes them,
so the separate float32 -> bf16 pass over the (B*T, 4C) activations and gradients is gone. The pass is split
over threads.THREADS threads (it calls no BLAS).

Covered: the tanh form (the model's default) on float32 NumPy arrays; anything else runs elementwise.py's
kernel (or the op) unchanged and offers nothing.
"""
import math

import numpy as np
from numba import njit

from ... import precision
from . import threads
from .elementwise import GELUNumba, gelu_tanh_backward, gelu_tanh_forward_float32
from .layer_norm import LayerNormNumba, _covered, _param, _rows, layer_norm_forward
from .mixed import PARALLEL_MIN_VALUES, bits


BLOCK = 4096   # values a block: computed by the float32 kernel, then converted while they are in L1


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True, nogil=True)
def _forward(x, out, outb, c, a, start, stop):
    """elementwise.gelu_tanh_forward_float32 on [start, stop), and outb = bf16 bits of out, a block at a time;
    t = tanh(u) goes to a block-sized scratch, not kept: backward computes it again. (The float32 kernel
    called on slices: the same loop written here over range(start, stop) with the conversion inside was
    not vectorised and ran 10x slower.)"""
    t = np.empty(BLOCK, np.float32)
    for b0 in range(start, stop, BLOCK):
        b1 = min(b0 + BLOCK, stop)
        gelu_tanh_forward_float32(x[b0:b1], t[:b1 - b0], out[b0:b1], c, a)
        bits(out[b0:b1], outb[b0:b1])


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True, nogil=True)
def _backward(x, dout, dx, dxb, c, a, start, stop):
    """elementwise.gelu_tanh_backward on [start, stop) with t = tanh(u) computed again a block at a time by
    the forward's own function (the same bits as a kept t), and dxb = bf16 bits of dx."""
    half, one, three = np.float32(0.5), np.float32(1), np.float32(3)
    t, scratch = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for b0 in range(start, stop, BLOCK):
        b1 = min(b0 + BLOCK, stop)
        n = b1 - b0
        gelu_tanh_forward_float32(x[b0:b1], t[:n], scratch[:n], c, a)
        gelu_tanh_backward(x[b0:b1], t[:n], dout[b0:b1], dx[b0:b1], c, a, half, one, three)
        bits(dx[b0:b1], dxb[b0:b1])


def _split(fn, n, *args, size=1):
    """fn(*args, start, stop) over [0, n) (items of `size` values each), split over threads when n * size is large."""
    if n * size < PARALLEL_MIN_VALUES:
        fn(*args, 0, n)
        return
    cuts = [n * i // threads.THREADS for i in range(threads.THREADS + 1)]
    threads.run_items(lambda s, e: fn(*args, s, e), list(zip(cuts, cuts[1:])), True, blas=False)


_C, _A = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)


class GELUBF16Numba:
    """functional.GELU (tanh form, float32) writing the bf16 copies of its output and input gradient beside
    them (module docstring); anything else: elementwise.GELUNumba. Saves x only: tanh(u) is computed again
    in backward (elementwise.py's kernel keeps it), which on the AMX Xeon, where these passes are bound by
    memory, is cheaper than writing and reading back 4 bytes a value (a (B*T, 4C) array a layer)."""

    @staticmethod
    def forward(ctx, x, approximate="none"):
        ctx.copies = type(x) is np.ndarray and x.dtype == np.float32 and approximate == "tanh"
        if not ctx.copies:
            return GELUNumba.forward(ctx, x, approximate=approximate)
        xf = np.ascontiguousarray(x).reshape(-1)
        out, outb = np.empty_like(xf), np.empty(xf.size, np.uint16)
        _split(_forward, xf.size, xf, out, outb, _C, _A)
        ctx.xf, ctx.shape = xf, x.shape
        out = out.reshape(x.shape)
        precision.offer_copy(out, outb.reshape(x.shape))
        return out

    # derivation: docs/backward/gelu.md
    @staticmethod
    def backward(ctx, dout):
        if not ctx.copies:
            return GELUNumba.backward(ctx, dout)
        xf = ctx.xf
        dx, dxb = np.empty_like(xf), np.empty(xf.size, np.uint16)
        d = np.ascontiguousarray(dout, dtype=np.float32).reshape(-1)
        _split(_backward, xf.size, xf, d, dx, dxb, _C, _A)
        dx = dx.reshape(ctx.shape)
        precision.offer_copy(dx, dxb.reshape(ctx.shape))
        return dx


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True, nogil=True)
def _layer_norm(x, w, b, eps, out, outb, mean, rstd, start, stop):
    """layer_norm.layer_norm_forward on rows [start, stop) of x (N, C), and outb (N*C,) = bf16 bits of out
    (N*C,), a block of rows at a time while it is in L1 (the rows are independent: the float32 kernel's bits)."""
    C = x.shape[1]
    step = max(1, BLOCK // C)
    o = out.reshape(x.shape)
    for r0 in range(start, stop, step):
        r1 = min(r0 + step, stop)
        layer_norm_forward(x[r0:r1], w, b, eps, o[r0:r1], mean[r0:r1], rstd[r0:r1])
        bits(out[r0 * C:r1 * C], outb[r0 * C:r1 * C])


class LayerNormBF16Numba:
    """functional.LayerNorm (float32: layer_norm.py's kernel to the bit) writing the bf16 copy of its output
    beside it: the output is the next product's operand (c_attn's, c_fc's, the LM head's). The backward is
    layer_norm.py's: its dx joins the residual stream, not a product. Anything but float32 NumPy arrays:
    LayerNormNumba, nothing offered."""

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        if not (_covered(x, w, b) and x.dtype == np.float32):
            return LayerNormNumba.forward(ctx, x, w, b, eps=eps)
        ctx.reference = False
        x2 = _rows(x)
        N, C = x2.shape
        out, outb = np.empty(N * C, np.float32), np.empty(N * C, np.uint16)
        mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
        ctx.w2 = _param(w, C, x.dtype, 1)
        _split(_layer_norm, N, x2, ctx.w2, _param(b, C, x.dtype, 0), np.float32(eps), out, outb, mean, rstd, size=C)
        ctx.x2, ctx.mean, ctx.rstd, ctx.shape = x2, mean, rstd, x.shape
        out = out.reshape(x.shape)
        precision.offer_copy(out, outb.reshape(x.shape))
        return out

    backward = staticmethod(LayerNormNumba.backward)
