"""oneDNN's matmul with bf16 operands and float32 sums and results: the other library the CPU's bf16 products
can run in (mkl.py is the first; TINYGRAD_LLM_CPU_BF16_GEMM picks, see bf16_gemm.py). Same interface as mkl.py:
gemm (2-D operands, transposed views read in place, a float32 bias added by oneDNN), batched (attention's 3-D /
4-D products, one oneDNN call) and PackedB / packed_b (a weight kept in the layout oneDNN prefers). The C API,
the loading and the primitive cache are in dnnl_api.py.

Why oneDNN as well: it is what PyTorch's bf16 matmul runs on, and on an Intel Xeon with AMX PyTorch ran the
step's short-K products (K = 128..384) 1.5-3x faster than MKL's cblas_gemm_bf16bf16f32 on one thread. Its
speed inside this project is not yet measured on a bf16 CPU (benchmarks/cpu_bf16_gemm.py --part onednn and
cpu_bf16_step.py --gemm time it).

Data types: uint16 operands are bf16 bits (as mixed.py makes them; ml_dtypes.bfloat16 arrays are taken as
well); float32 operands run oneDNN's float32 matmul, through the same code: the tests check the plumbing
with it on CPUs whose oneDNN has no bf16 matmul.
"""
import threading

import numpy as np

from . import dnnl_api as api, libraries, threads
from .dnnl_api import ENV_PATH, HINT, candidates, f32_reason, missing_reason  # noqa: F401 (this module's interface)

NAME = "onednn"
PARALLEL_MIN_FLOPS = 1 << 28   # as mkl.PARALLEL_MIN_FLOPS: below this a product runs on one thread


def _dtype_of(*arrays):
    """oneDNN's data type for these operands: bf16 for uint16 bits or ml_dtypes' bfloat16, f32 for float32."""
    names = {x.dtype.name for x in arrays}
    if names <= {"uint16", "bfloat16"}:
        return api._BF16
    if names == {"float32"}:
        return api._F32
    raise ValueError(f"oneDNN matmul operands must be bf16 (uint16 bits) or float32, not {sorted(names)}")


def _matrix(x, item):
    """(dims, strides in elements) of a 2-D operand with a unit stride on one axis (a transposed view is read in
    place); an axis of length one gets a stride that makes the layout plain."""
    (rows, cols), (sr, sc) = x.shape, x.strides
    if sr % item or sc % item or sr < 0 or sc < 0:
        raise ValueError(f"oneDNN matmul operand strides {x.strides} are not whole elements")
    sr, sc = sr // item, sc // item
    if rows == 1:
        sr, sc = (cols, 1) if sc == 1 or cols == 1 else (1, sc)
    elif cols == 1:
        sr, sc = (1, rows) if sr == 1 else (sr, 1)
    if (sc == 1 and sr >= cols) or (sr == 1 and sc >= rows):
        return (rows, cols), (sr, sc)
    raise ValueError(f"oneDNN matmul operand of shape {x.shape} and strides {x.strides}: no unit stride")


def _batch(x, item):
    """(dims, strides in elements) of a 3-D / 4-D operand: its last two axes as _matrix reads them, each leading
    axis with its own stride (an axis of length one: the extent of what follows it)."""
    dims, strides = _matrix(x[(0,) * (x.ndim - 2)], item)
    lead_dims, lead_strides = list(x.shape[:-2]), []
    extent = max(s * (d - 1) for d, s in zip(dims, strides)) + 1
    for d, s in zip(reversed(x.shape[:-2]), reversed(x.strides[:-2])):
        if s % item:
            raise ValueError(f"oneDNN matmul operand strides {x.strides} are not whole elements")
        lead_strides.insert(0, s // item if d > 1 else extent)
        extent += (d - 1) * (s // item)
    return tuple(lead_dims) + dims, tuple(lead_strides) + strides


class PackedB:
    """A GEMM's right operand b (K, N) (bf16 bits, or float32) kept in the layout oneDNN's matmul prefers for it
    (a reorder of b into the weights layout a format_tag_any primitive picks), for products that use it again
    and again: a weight's copy, made once per precision.weight_copies region, serves every micro-batch's
    product. The layout may depend on the product's rows (M), so the reorder is made on the first product of
    each layout and kept: one per weight copy in a step whose micro-batches have one shape. Same shape
    contract as b; only dnnl.gemm reads it."""

    def __init__(self, b):
        self.dt = _dtype_of(b)
        api._lib(self.dt)
        _matrix(b, b.itemsize)   # a layout gemm can read
        self.b, self.shape = b, b.shape
        self.layouts = []        # (memory descriptor, buffer)
        self._lock = threading.Lock()

    def buffer(self, md):
        """(buffer, address) of b's values in the weights layout md, reordered on first use."""
        equal = api._loaded_lib.dnnl_memory_desc_equal
        for known, buf in self.layouts:
            if equal(known, md):
                return buf
        with self._lock:
            for known, buf in self.layouts:
                if equal(known, md):
                    return buf
            buf, addr, clone = api.reorder(self.dt, self.b.ctypes.data, *_matrix(self.b, self.b.itemsize), md)
            self.layouts.append((clone, (buf, addr)))
            return buf, addr


def packed_b(b):
    """PackedB(b) where oneDNN's bf16 matmul loads, else b itself (dnnl.gemm takes either)."""
    return PackedB(b) if missing_reason() is None else b


def _one(a, b, out, alpha, beta, bias):
    """One oneDNN call: out (M, N) float32 = alpha a b + beta out (+ bias)."""
    packed = type(b) is PackedB
    dt = _dtype_of(a, b.b if packed else b)
    item = a.itemsize
    a_dims, a_strides = _matrix(a, item)
    c_dims, c_strides = _matrix(out, 4)
    if packed:
        prim = api.primitive(dt, 1, a_dims, a_strides, b.shape, None, c_dims, c_strides, bias is not None, alpha, beta,
                          format_any=True)
        b_ptr = b.buffer(prim.mds[1])[1]
    else:
        b_dims, b_strides = _matrix(b, item)
        prim = api.primitive(dt, 1, a_dims, a_strides, b_dims, b_strides, c_dims, c_strides, bias is not None, alpha,
                          beta)
        b_ptr = b.ctypes.data
    prim.run(a.ctypes.data, b_ptr, out.ctypes.data, None if bias is None else bias.ctypes.data)


def gemm(a, b, out, alpha=1.0, beta=0.0, parallel=True, bias=None):
    """out (M, N) float32 = alpha a b + beta out (+ bias): mkl.gemm's contract, in oneDNN. a (M, K) and b (K, N)
    bf16 bits (uint16; or both float32: oneDNN's float32 matmul), C- or F-ordered 2-D arrays or views (a
    transposed operand is read in place), or b a PackedB; out with unit column stride. Float32 sums.
    bias (N,) float32, added by oneDNN to each output row; alpha must then be 1 (oneDNN would scale the bias
    too). parallel: a product of at least PARALLEL_MIN_FLOPS is split by output rows (by columns when it has
    few rows) over threads.THREADS threads; False inside work that is already spread over threads."""
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or out.shape != (M, N) or out.dtype != np.float32 or out.strides[1] != 4:
        raise ValueError(f"bf16 GEMM shapes {a.shape} x {b.shape} -> {out.shape} ({out.dtype}, strides {out.strides})")
    if bias is not None:
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if bias.shape != (N,) or alpha != 1.0:
            raise ValueError(f"oneDNN GEMM bias of shape {bias.shape} for {N} columns (alpha {alpha}: must be 1)")
    if M == 0 or N == 0:
        return out
    if K == 0:
        out[...] = 0 if beta == 0 else out * np.float32(beta)
        if bias is not None:
            out += bias
        return out
    alpha, beta = float(alpha), float(beta)
    n = threads.THREADS
    if not parallel or n < 2 or 2 * M * N * K < PARALLEL_MIN_FLOPS:
        _one(a, b, out, alpha, beta, bias)
        return out
    if M >= N or M >= 64 * n or type(b) is PackedB:   # a packed b is whole: its products split by rows
        cuts = [M * i // n for i in range(n + 1)]
        items = [(a[r0:r1], b, out[r0:r1], alpha, beta, bias) for r0, r1 in zip(cuts, cuts[1:]) if r1 > r0]
    else:
        cuts = [N * i // n for i in range(n + 1)]
        items = [(a, b[:, c0:c1], out[:, c0:c1], alpha, beta, None if bias is None else bias[c0:c1])
                 for c0, c1 in zip(cuts, cuts[1:]) if c1 > c0]
    threads.run_items(_one, items, True, blas=False)
    return out


def batched(a, b, out, alpha=1.0, beta=0.0):
    """mkl.batched's contract in one oneDNN call: out[i] = alpha a[i] b[i] + beta out[i] for every leading index
    of a (..., M, K), b (..., K, N), out (..., M, N), one or two leading axes each with strides of its own (views
    into attention's heads), on this thread."""
    shapes = libraries.batched_shapes(a, b, out, beta)
    if shapes is None:
        return out
    lead, M, K, N = shapes
    dt, item = _dtype_of(a, b), a.itemsize
    (ad, ast), (bd, bst), (cd, cst) = _batch(a, item), _batch(b, item), _batch(out, 4)
    prim = api.primitive(dt, len(lead), ad, ast, bd, bst, cd, cst, False, float(alpha), float(beta))
    prim.run(a.ctypes.data, b.ctypes.data, out.ctypes.data)
    return out
