"""MKL's bf16 GEMM (cblas_gemm_bf16bf16f32: bf16 operands, float32 sums and results) through ctypes: the CPU's
bf16 products (precision.py's policy; the kernels in mixed.py and mixed_attention.py).

Why MKL: NumPy has no bf16 dtype and its OpenBLAS no bf16 GEMM we can reach; MKL ships one that runs on AMX
tiles or AVX512-BF16 where the CPU has them, as a wheel on PyPI (`pip install tinygrad_llm[mkl]`): no compiler
needed. It is found at run time, in this order: the path in TINYGRAD_LLM_MKL (libmkl_rt's file), the `mkl`
distribution's own files (importlib.metadata: the wheel puts libmkl_rt.so.3 in the environment's lib/),
sys.prefix/lib, and the system's library path.

Threads: MKL is switched to its sequential layer before its first call (MKL_Set_Threading_Layer): its
OpenMP layers need an OpenMP runtime loaded beside it (the default Intel one fails to load without libiomp5
preloaded, and one more OpenMP pool would fight OpenBLAS's and Numba's over the cores). A large product is
split by rows of its output over threads.THREADS Python threads instead, each calling MKL on one thread
(ctypes lets go of the GIL during the call).
"""
import ctypes

import numpy as np
from numba import njit

from . import libraries, threads

NAME = "mkl"                                      # bf16_gemm.py's name for this library
ENV_PATH = "TINYGRAD_LLM_MKL"
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112   # CBLAS_LAYOUT, CBLAS_TRANSPOSE
_PACKED, _B_MATRIX = 151, 162                     # CblasPacked (a transb value), CBLAS_IDENTIFIER's CblasBMatrix
_SEQUENTIAL = 1                                   # MKL_THREADING_SEQUENTIAL
PARALLEL_MIN_FLOPS = 1 << 28                      # below this a product runs on one thread: the hand-off costs more
                                                  # (AMX Xeon, 4x128 step: 2^23 against 2^28, benchmarks/RESULTS.md)
BIAS_BLOCK_BYTES = 4 << 20                        # gemm(bias=...): rows of out a product block, by their bytes
                                                  # (AMX Xeon, 2 threads: 256K, 1M, 4M blocks measured; 4M fastest)
_state = None                                     # (function, None) once loaded, (None, reason) once failed
_packing = None                                   # (get_size, pack, compute) where the library has them
_by_address = {}                                  # function address -> the same function typed for Numba


def candidates():
    """The paths tried for libmkl_rt, in order (TINYGRAD_LLM_MKL alone when it is set)."""
    return libraries.candidates(ENV_PATH, "mkl", ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"), "mkl_rt")


_GEMM_ARGS = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_float, ctypes.c_void_p, ctypes.c_int]


def _load_packing(lib):
    """MKL's packed-operand API for the bf16 GEMM (pack_get_size, pack, compute), where the library has it."""
    global _packing
    try:
        size, pack, compute = (lib.cblas_gemm_bf16bf16f32_pack_get_size, lib.cblas_gemm_bf16bf16f32_pack,
                               lib.cblas_gemm_bf16bf16f32_compute)
    except AttributeError:
        return
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_int] * 4
    pack.restype = None
    pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    compute.restype, compute.argtypes = None, _GEMM_ARGS
    _packing = (size, pack, compute)


def _load():
    global _state

    def setup(lib):
        lib.MKL_Set_Threading_Layer(ctypes.c_int(_SEQUENTIAL))   # before any other call into MKL
        lib.cblas_gemm_bf16bf16f32

    lib, _, reason = libraries.open_first(candidates(), setup, "no libmkl_rt on the library path")
    if lib is None:
        _state = (None, reason)
        return
    gemm = lib.cblas_gemm_bf16bf16f32
    gemm.restype = None
    gemm.argtypes = _GEMM_ARGS
    _state = (gemm, None)
    _load_packing(lib)


def missing_reason():
    """None when MKL's bf16 GEMM is loaded (loading it on the first call), else one line saying why not."""
    if _state is None:
        _load()
    return _state[1]


def _function():
    if missing_reason() is not None:
        raise RuntimeError(f"bf16 products on the CPU need MKL's bf16 GEMM, {missing_reason()}: "
                           "pip install 'tinygrad_llm[mkl]'")
    return _state[0]


def _numba_function(fn):
    """fn (the ctypes function) as a ctypes function whose pointers are uint64 integers: what Numba's compiled
    loops call (an address is an integer there); one object per address, made on first use."""
    address = ctypes.cast(fn, ctypes.c_void_p).value
    typed = _by_address.get(address)
    if typed is None:
        ints, ptr = [ctypes.c_int] * 6, ctypes.c_uint64
        typed = _by_address[address] = ctypes.CFUNCTYPE(None, *ints, ctypes.c_float, ptr, ctypes.c_int, ptr,
                                                         ctypes.c_int, ctypes.c_float, ptr, ctypes.c_int)(address)
    return typed


@njit(cache=True, nogil=True)
def _batched_loop(fn, L1, L2, ta, tb, M, N, K, alpha, pa, sa1, sa2, lda, pb, sb1, sb2, ldb, beta, pc, sc1, sc2, ldc):
    """fn (cblas_gemm_bf16bf16f32) for products (i, j) in [0, L1) x [0, L2): operands at pa + i sa1 + j sa2,
    pb + i sb1 + j sb2, pc + i sc1 + j sc2 (bytes)."""
    for i in range(L1):
        for j in range(L2):
            fn(_ROW_MAJOR, ta, tb, M, N, K, alpha, np.uint64(pa + i * sa1 + j * sa2), lda,
               np.uint64(pb + i * sb1 + j * sb2), ldb, beta, np.uint64(pc + i * sc1 + j * sc2), ldc)


def _operand(a):
    """(trans flag, leading dimension) of a 2-D uint16 array or view whose rows or columns are contiguous."""
    rows, cols = a.strides
    if cols == 2 and rows % 2 == 0 and rows >= 2 * max(a.shape[1], 1):
        return _NO_TRANS, rows // 2
    if rows == 2 and cols % 2 == 0 and cols >= 2 * max(a.shape[0], 1):
        return _TRANS, cols // 2
    raise ValueError(f"bf16 GEMM operand of shape {a.shape} and strides {a.strides}: no unit stride")


class PackedB:
    """A GEMM's right operand b (K, N) (bf16 bits, any layout _operand reads) copied once into MKL's own
    packed layout (cblas_gemm_bf16bf16f32_pack), for products that use it again and again: a weight's
    copy, made once a step (precision.weight_copy), serves every micro-batch's product. Measured on an
    Intel Xeon with AMX (one thread, the 6x384 step's Linear shapes, 8192 rows): the forward x w ran at
    134-151 GFLOP/s with w as bf16 bits and 183-554 with w packed; dout w^T at 280-672 and 323-962.
    Same shape contract as b; only mkl.gemm reads it."""

    def __init__(self, b):
        _function()   # loads MKL, or says why it cannot
        if _packing is None:
            raise RuntimeError("this MKL has no packed bf16 GEMM (cblas_gemm_bf16bf16f32_pack)")
        size, pack, _ = _packing
        self.shape = K, N = b.shape
        tb, ldb = _operand(b)
        # get_size's and pack's m is op(A)'s row count; for a B matrix the layout does not depend on it
        self.buffer = np.empty(-(-size(_B_MATRIX, 1, N, K) // 2), np.uint16)
        pack(_ROW_MAJOR, _B_MATRIX, tb, 1, N, K, b.ctypes.data, ldb, self.buffer.ctypes.data)
        self.ldb = ldb


def packed_b(b):
    """PackedB(b) where MKL packs bf16 operands, else b itself (mkl.gemm takes either)."""
    return PackedB(b) if missing_reason() is None and _packing is not None else b


def _one(gemm, a, b, out, alpha, beta):
    M, K = a.shape
    N = b.shape[1]
    ta, lda = _operand(a)
    if type(b) is PackedB:
        _packing[2](_ROW_MAJOR, ta, _PACKED, M, N, K, alpha, a.ctypes.data, lda, b.buffer.ctypes.data, b.ldb, beta,
                    out.ctypes.data, out.strides[0] // 4)
        return
    tb, ldb = _operand(b)
    gemm(_ROW_MAJOR, ta, tb, M, N, K, alpha, a.ctypes.data, lda, b.ctypes.data, ldb, beta, out.ctypes.data,
         out.strides[0] // 4)


def _rows_with_bias(fn, a, b, out, alpha, beta, bias, rows):
    """_one over blocks of `rows` rows, each followed by out += bias while the block is still in cache."""
    for r0 in range(0, a.shape[0], rows):
        block = out[r0:r0 + rows]
        _one(fn, a[r0:r0 + rows], b, block, alpha, beta)
        block += bias


def gemm(a, b, out, alpha=1.0, beta=0.0, parallel=True, bias=None):
    """out (M, N) float32 = alpha a b + beta out: a (M, K) and b (K, N) uint16 arrays of bf16 bits (C- or
    F-ordered 2-D arrays or views: a transposed operand is read in place) or b a PackedB, out with unit
    column stride.
    Float32 sums. parallel: a large product is split by output rows (by columns when it has few rows) over
    threads.THREADS threads; False inside work that is already spread over threads. bias (N,) float32: then
    out = alpha a b + beta out + bias, the bias added a block of BIAS_BLOCK_BYTES of out at a time right
    after its product (out + bias in float32, as a separate pass would add it, without reading out again
    from memory)."""
    fn = _function()
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or out.shape != (M, N) or out.dtype != np.float32 or out.strides[1] != 4:
        raise ValueError(f"bf16 GEMM shapes {a.shape} x {b.shape} -> {out.shape} ({out.dtype}, strides {out.strides})")
    if M == 0 or N == 0:
        return out
    if K == 0:
        out[...] = 0 if beta == 0 else out * np.float32(beta)
        return out
    rows = max(1, BIAS_BLOCK_BYTES // (4 * N))

    def run(x, y, z, c):
        if c is None:
            _one(fn, x, y, z, alpha, beta)
        else:
            _rows_with_bias(fn, x, y, z, alpha, beta, c, rows)

    n = threads.THREADS
    if not parallel or n < 2 or 2 * M * N * K < PARALLEL_MIN_FLOPS:
        run(a, b, out, bias)
        return out
    if M >= N or M >= 64 * n or type(b) is PackedB:   # a packed b is whole: its products split by rows
        cuts = [M * i // n for i in range(n + 1)]
        items = [(a[r0:r1], b, out[r0:r1], bias) for r0, r1 in zip(cuts, cuts[1:]) if r1 > r0]
    else:
        cuts = [N * i // n for i in range(n + 1)]
        items = [(a, b[:, c0:c1], out[:, c0:c1], None if bias is None else bias[c0:c1])
                 for c0, c1 in zip(cuts, cuts[1:]) if c1 > c0]
    threads.run_items(run, items, True, blas=False)
    return out


def batched(a, b, out, alpha=1.0, beta=0.0):
    """gemm for every leading index of a (..., M, K), b (..., K, N), out (..., M, N), on this thread: one or
    two leading axes (attention's batch entries, or batch entries and heads), each with strides of its own.
    The operands' layout is read once and each product's addresses are stepped from the first's, in a Numba
    loop that calls MKL by its address without the GIL: attention makes thousands of small products a step,
    and a ctypes call from a Python loop cost about 6.5 us a product on this project's loaded 2-core machine."""
    fn = _function()
    shapes = libraries.batched_shapes(a, b, out, beta)
    if shapes is None:
        return out
    lead, M, K, N = shapes
    first = (0,) * len(lead)
    (ta, lda), (tb, ldb) = _operand(a[first]), _operand(b[first])
    L1, L2 = (1,) + lead if len(lead) == 1 else lead
    (sa1, sa2), (sb1, sb2), (sc1, sc2) = [(0,) + x.strides[:1] if x.ndim == 3 else x.strides[:2] for x in (a, b, out)]
    _batched_loop(_numba_function(fn), L1, L2, ta, tb, M, N, K, alpha, a.ctypes.data, sa1, sa2, lda,
                  b.ctypes.data, sb1, sb2, ldb, beta, out.ctypes.data, sc1, sc2, out.strides[-2] // 4)
    return out


def batched_python(a, b, out, alpha=1.0, beta=0.0):
    """batched's reference: the same MKL calls, one ctypes call each from a Python loop (tests compare them)."""
    if a.ndim == 4:
        for i in range(a.shape[0]):
            batched_python(a[i], b[i], out[i], alpha, beta)
        return out
    fn = _function()
    L, M, K = a.shape
    N = b.shape[2]
    if L == 0 or M == 0 or N == 0 or K == 0:
        return batched(a, b, out, alpha, beta)
    (ta, lda), (tb, ldb) = _operand(a[0]), _operand(b[0])
    pa, pb, pc = a.ctypes.data, b.ctypes.data, out.ctypes.data
    sa, sb, sc, ldc = a.strides[0], b.strides[0], out.strides[0], out.strides[1] // 4
    for i in range(L):
        fn(_ROW_MAJOR, ta, tb, M, N, K, alpha, pa + i * sa, lda, pb + i * sb, ldb, beta, pc + i * sc, ldc)
    return out
