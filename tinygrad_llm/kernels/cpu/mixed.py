"""bf16 products with float32 sums on NumPy arrays (precision.py's policy): Linear (and so the LM head) under
precision.autocast("bfloat16"), its GEMMs in MKL (mkl.py) or oneDNN (dnnl.py), as TINYGRAD_LLM_CPU_BF16_GEMM
picks (bf16_gemm.py); attention's are in mixed_attention.py.

How bf16 is held: as NumPy uint16 arrays of the bits, made by one Numba pass (round to nearest even, NaN
kept a quiet NaN), as the GPU's kernels hold it. ml_dtypes' bfloat16 dtype would give the same bits at
the same speed (4.2 against 4.5 ms for 6.3M values on this project's 2-core CPU), but nothing here does
arithmetic on bf16 values outside MKL, so it would add a dependency for storage alone; and a Numba pass
can fuse the conversion into a copy that happens anyway (attention's head split, with its scale).

Where bf16 lives: only as the products' operands. The autograd's tensors stay float32, so LayerNorm, softmax,
GELU, dropout and the loss run their float32 kernels unchanged, and no gradient is rounded before it is
summed. What a product saves for backward is its bf16 operand (x), half the bytes of the float32 input.
Weights are converted once per precision.weight_copies region (precision.weight_copy), not once per use.
"""
import numpy as np
from numba import njit

from ... import precision
from ...functional import Linear
from . import bf16_gemm, threads

PARALLEL_MIN_VALUES = 1 << 20   # a conversion of at least this many values is split over threads.THREADS


@njit(parallel=False, error_model="numpy", cache=True, nogil=True)
def bits(x, y):
    """y[i] = bf16 bits of x[i]: x float32 1-D, y uint16 1-D of x's length."""
    u = x.view(np.uint32)
    for i in range(x.shape[0]):
        b = u[i]
        if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            y[i] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
        else:
            y[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(parallel=False, error_model="numpy", cache=True, nogil=True)
def _to_bf16_flat(x, y, start, stop):
    """y[i] = bf16 bits of x[i] for i in [start, stop). Through slices and `bits`: the same loop over
    range(start, stop) ran 4x slower (41 against 10 ms for 25M values on this project's 2-core CPU)."""
    bits(x[start:stop], y[start:stop])


def to_bf16(x):
    """float32 array -> uint16 array of its bf16 bits, same shape; a 2-D F-ordered array (a transposed view,
    the tied LM head's wte^T) keeps its layout, so the GEMM reads it transposed rather than it being copied."""
    if x.ndim == 2 and not x.flags.c_contiguous and x.T.flags.c_contiguous:
        return to_bf16(x.T).T
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat, y = x.reshape(-1), np.empty(x.size, np.uint16)
    n = flat.size
    if n < PARALLEL_MIN_VALUES:
        _to_bf16_flat(flat, y, 0, n)
    else:
        cuts = [n * i // threads.THREADS for i in range(threads.THREADS + 1)]
        threads.run_items(lambda a, b: _to_bf16_flat(flat, y, a, b), list(zip(cuts, cuts[1:])), True, blas=False)
    return y.reshape(x.shape)


@njit(parallel=False, error_model="numpy", cache=True, nogil=True)
def _column_sums(d, db, total, start, stop):
    """total (M,) float64 += column sums of d (N, M) over rows [start, stop); when db (N*M,) has N*M values,
    db = bf16 bits of those rows too, a block of rows at a time while they are in L1 (db of size 0: sums only).
    A block's rows are summed in float32 (8 lanes), in row order, and the block's sum is added in float64."""
    M = d.shape[1]
    step = max(1, 4096 // M)
    flat = d.reshape(-1)
    part = np.empty(M, np.float32)
    for r0 in range(start, stop, step):
        r1 = min(r0 + step, stop)
        part[:] = d[r0]
        for r in range(r0 + 1, r1):
            row = d[r]
            for j in range(M):
                part[j] += row[j]
        for j in range(M):
            total[j] += part[j]
        if db.shape[0] > 0:
            bits(flat[r0 * M:r1 * M], db[r0 * M:r1 * M])


def column_sums(d, convert):
    """(the column sums of float32 d (N, M), as float32 (M,); d's bf16 bits (N, M) when convert, else None) in
    one pass over d: the bias gradient and dout's conversion together. The sums run in float64 per thread's
    rows, in row order, and the threads' partial sums are added in thread order: the same sums, bitwise,
    whether convert is asked or not (the producer's copy taken or not)."""
    N, M = d.shape
    db = np.empty(N * M if convert else 0, np.uint16)
    n = threads.THREADS if d.size >= PARALLEL_MIN_VALUES else 1
    totals = np.zeros((n, M))
    cuts = [N * i // n for i in range(n + 1)]
    items = [(totals[i], cuts[i], cuts[i + 1]) for i in range(n)]
    if n == 1:
        _column_sums(d, db, totals[0], 0, N)
    else:
        threads.run_items(lambda t, a, b: _column_sums(d, db, t, a, b), items, True, blas=False)
    total = totals[0]
    for i in range(1, n):
        total = total + totals[i]
    return total.astype(np.float32), (db.reshape(N, M) if convert else None)


def operand(x):
    """x's bf16 bits as a product's operand: the copy its producer wrote in the same pass when it offered one
    (precision.take_copy: GELU's output, GELU's input gradient), else converted here."""
    copy = precision.take_copy(x)
    return copy if copy is not None else to_bf16(x)


def from_bf16(y):
    """uint16 bf16 bits -> float32 (exact)."""
    return (np.ascontiguousarray(y).astype(np.uint32) << np.uint32(16)).view(np.float32)


class LinearBF16Mkl:
    """functional.Linear with bf16 operands: out = x w (+ b), dx = dout w^T, dw = x^T dout, each one bf16 GEMM
    with float32 sums and float32 results, in MKL or oneDNN (bf16_gemm.library(), chosen at the forward; the
    backward uses the same); b added in float32 (mkl.gemm's bias: a block of rows at a time, right after its
    product; oneDNN's: in its matmul), db = sum(dout) summed in float64 in
    the pass that converts dout (column_sums) where no producer handed its copy over. Saves the bf16
    x and w for backward. w enters its two products packed (mkl.PackedB, or dnnl.PackedB: oneDNN's preferred
    layout; w for the forward, w^T for dx), each packing made once per weight_copies region. Anything but
    float32 inputs takes the op itself."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        ctx.reference = not (all(a is None or (type(a) is np.ndarray and a.dtype == np.float32) for a in (x, w, b))
                             and w.ndim == 2 and x.ndim >= 1 and x.shape[-1] == w.shape[0] and x.size > 0)
        if ctx.reference:
            return Linear.forward(ctx, x, w, b)
        lib = bf16_gemm.library()   # mkl or dnnl, or a one-line error saying what is missing
        K, M = w.shape
        xb = operand(x).reshape(-1, K)
        wb = precision.weight_copy(w, to_bf16)
        out = lib.gemm(xb, precision.weight_copy(w, lambda _: lib.packed_b(wb), f"{lib.NAME} packed"),
                       np.empty((xb.shape[0], M), np.float32), bias=b)
        ctx.w, ctx.xb, ctx.wb, ctx.x_shape, ctx.has_b, ctx.lib = w, xb, wb, x.shape, b is not None, lib
        return out.reshape(x.shape[:-1] + (M,))

    # derivation: docs/backward/linear.md
    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return Linear.backward(ctx, dout)
        xb, wb, lib = ctx.xb, ctx.wb, ctx.lib
        (N, K), M = xb.shape, wb.shape[1]
        need = ctx.needs_input_grad
        dob, db = precision.take_copy(dout), None
        if ctx.has_b and need[2]:   # db = sum(dout), with dout's conversion in the same pass where it is needed
            db, converted = column_sums(np.ascontiguousarray(dout, dtype=np.float32).reshape(N, M), dob is None)
            dob = dob if dob is not None else converted
        dob = (dob if dob is not None else to_bf16(dout)).reshape(N, M)
        # dx = dout w^T, dw = x^T dout (summed over every leading axis)
        if need[0]:   # w^T packed once a region too (from the copy the forward used)
            wt = precision.weight_copy(ctx.w, lambda _: lib.packed_b(wb.T), f"{lib.NAME} packed, transposed")
            dx = lib.gemm(dob, wt, np.empty((N, K), np.float32)).reshape(ctx.x_shape)
        else:
            dx = None
        dw = lib.gemm(xb.T, dob, np.empty((K, M), np.float32)) if need[1] else None
        return dx, dw, db
