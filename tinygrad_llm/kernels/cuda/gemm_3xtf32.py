"""Float32 matrix products on the tensor cores at float32's accuracy ("3xTF32"): row-major C = op(A) op(B)
(+ bias) (+ beta C) for strict float32 (TF32 off), in place of cuBLAS's float32 GEMM (derivation of the error:
docs/backward/linear.md).

Each float32 operand x is split into tf32 words hi (x rounded to 11 significant bits) and lo = x - hi (exact;
the tensor cores read its top 11 significant bits), and each product a b is taken as a_lo b_hi + a_hi b_lo +
a_hi b_hi (m16n8k8 mma.sync). hi + lo holds x to within 2^-21 |x| and the dropped a_lo b_lo is under 2^-22 |a b|.
The tensor cores' own sums truncate, so each k tile's 12 products a fragment are summed apart and then added
into float32 sums rounded to nearest: the error does not build up along k. On the H200 the products of the 6x384
step came out closer to float64 than cuBLAS's float32 ones, and faster (benchmarks/RESULTS.md): the tensor cores
do three tf32 products in less time than the CUDA cores take for one float32 product.

Blocks of BM x BN outputs, 8 warps (each WM x WN), k in steps of 32 through a STAGES-deep ring of
shared-memory tiles filled by cp.async (16 bytes a copy, zeros past the matrix). A tile keeps its global
layout (k-contiguous, or m/n-contiguous), padded so that every fragment read hits 32 distinct banks; each
8-wide k block is read in the order k = 2t, 2t + 1 for the fragments' slots t, t + 4 (a sum over k does not
depend on its order when both operands agree), so a lane's two words of a k-contiguous fragment are
neighbours (one 8-byte read). Products with few output tiles for the GPU's multiprocessors (the weight
gradients: 384 x 1152 outputs summed over 16,384 rows) split k across blocks where a model of the waves says it
pays (_slices), each slice writing its partial sums to a kept workspace (one a device, made on the first split
product: the eager warm-up steps make it before a graph is captured) that a second kernel adds in slice order:
results do not depend on scheduling. Products on one stream only (the workspace is shared).

MODE (TINYGRAD_LLM_FP32_GEMM, read at import): "3xtf32" (default) sends every strict-float32 product that
takes() accepts here (cublas.gemm, Linear's forward); "cublas" keeps cuBLAS's float32 GEMM. TF32 mode
(backend.set_tf32) keeps cuBLAS's one-product TF32. Launches only: capturable into a CUDA graph.
"""
import functools
import os

import cupy as cp
import numpy as np
from cupy.cuda import cublas

from .cublaslt import compute_type
from .gemm_3xtf32_kernels import SOURCE
from .runtime import default_pool, register_cache


MODE = os.environ.get("TINYGRAD_LLM_FP32_GEMM", "3xtf32")
MODES = ("3xtf32", "cublas")
# (BM, BN, WM, WN, STAGES): the block's outputs, each warp's, and the depth of the ring of k tiles
CONFIG = (128, 128, 64, 32, 3)
MIN_SIZE = 64              # rows and columns of C below which cuBLAS keeps the product
WORKSPACE_BYTES = 32 << 20   # the split-k slices' partial sums (kept, so a captured graph's replays reuse it)
_modules = {}
_workspace = register_cache({})   # device id -> the kept workspace (a captured graph keeps it alive)


def shared_bytes(config, trans_a, trans_b):
    """Dynamic shared memory of a kernel: STAGES x (A's tile + B's tile) float32 words (Tile's layouts)."""
    BM, BN, _, _, stages = config
    words = lambda R, kcontig: R * 40 if kcontig else 32 * (R + 4)
    return 4 * stages * (words(BM, not trans_a) + words(BN, trans_b))


def _kernel(config, trans_a, trans_b):
    key = (config, trans_a, trans_b)
    if key not in _modules:
        flags = ["true" if v else "false" for v in (trans_a, trans_b)]
        expr = "gemm3x<{}, {}, {}, {}, {}, {}, {}>".format(*config, *flags)
        module = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=[expr, "gemm3x_sum"])
        fn, smem = module.get_function(expr), shared_bytes(config, trans_a, trans_b)
        fn.max_dynamic_shared_size_bytes = smem
        _modules[key] = fn, smem, module.get_function("gemm3x_sum"), _resident(fn, smem)
    return _modules[key]


def enabled():
    """MODE, checked: True for "3xtf32", False for "cublas", a clear error naming the variable otherwise."""
    mode = str(MODE).strip()
    if mode not in MODES:
        raise ValueError(f"TINYGRAD_LLM_FP32_GEMM must be 3xtf32 or cublas, got {MODE!r}")
    return mode == "3xtf32"


# Compute capabilities whose tensor cores run tf32 products at 7-8x the CUDA cores' float32 rate (A100; H100,
# H200), so three tf32 products can beat one float32 one (measured on the H200). The RTX and L-series parts
# (8.6, 8.9, 12.0) run tf32 at about their float32 rate, and allow 99 KiB of shared memory a block: cuBLAS.
CAPABILITIES = (80, 90)
_devices = {}   # device id -> (a capability of CAPABILITIES, multiprocessors, shared memory a block may ask for)
_SHARED_OPTIN = 97   # cudaDevAttrMaxSharedMemoryPerBlockOptin


def _device():
    dev = cp.cuda.Device()
    if dev.id not in _devices:
        try:
            shared = cp.cuda.runtime.deviceGetAttribute(_SHARED_OPTIN, dev.id)
        except Exception:   # (a runtime that cannot say: the kernels are not used)
            shared = 0
        _devices[dev.id] = int(dev.compute_capability) in CAPABILITIES, dev.attributes["MultiProcessorCount"], shared
    return _devices[dev.id]


def takes(M, N, K, a, lda, b, ldb, c, ldc, bias=0, trans_a=False, trans_b=False):
    """True when a float32 product goes to gemm(): MODE on, TF32 off (strict float32), a GPU of CAPABILITIES with
    the shared memory the kernel asks for, and supported()."""
    if not enabled():
        return False
    if compute_type(np.float32) != cublas.CUBLAS_COMPUTE_32F:
        return False
    capable, _, shared = _device()
    return (capable and shared_bytes(CONFIG, trans_a, trans_b) <= shared
            and supported(M, N, K, a, lda, b, ldb, c, ldc, bias, trans_a, trans_b))


def supported(M, N, K, a, lda, b, ldb, c, ldc, bias=0, trans_a=False, trans_b=False):
    """True when gemm takes the product (op(A) M x K, A stored K x M when trans_a; op(B) K x N, stored N x K when
    trans_b): M and N at least MIN_SIZE, M, N and K multiples of 4, row strides multiples of 4 elements and at
    least their rows' lengths, every address 16-byte aligned (the tiles load 16 bytes a copy; bias: 0 for none),
    and M within CUDA's grid (65,535 row blocks)."""
    return (M >= MIN_SIZE and N >= MIN_SIZE and K > 0 and M % 4 == 0 and N % 4 == 0 and K % 4 == 0
            and M <= 65535 * CONFIG[0] and lda >= (M if trans_a else K) and ldb >= (K if trans_b else N) and ldc >= N
            and all(int(s) % 4 == 0 for s in (lda, ldb, ldc)) and all(int(p) % 16 == 0 for p in (a, b, c, bias)))


def _resident(fn, smem):
    """Blocks of `fn` a multiprocessor holds at once (the driver's occupancy answer; 1 where it cannot say)."""
    try:
        return max(1, cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, 256, smem))
    except Exception:
        return 1


def _slices(M, N, K, config, per_sm=1):
    """The number of k slices S. The blocks (output tiles x S) run in waves of per_sm blocks a multiprocessor, and
    a block takes its K / S / 32 k tiles plus about 4 tiles' time for filling the ring and storing: S minimises
    waves x (K / (32 S) + 4), ties to the fewer. (384 x 384 outputs over K = 16,384 on 132 multiprocessors: 9
    tiles, S = 14, one wave of 126 blocks; 768 x 3072 over 8,192: 144 tiles, S = 3, where unsplit they would take
    2 waves, the second 12 blocks wide.) Each slice at least 8 k tiles, the partial sums within WORKSPACE_BYTES."""
    BM, BN = config[:2]
    most = max(1, min(K // (8 * 32), WORKSPACE_BYTES // (4 * M * N), 64))
    return _cheapest(-(-M // BM) * -(-N // BN), _device()[1] * per_sm, K, most)


@functools.lru_cache(maxsize=1024)
def _cheapest(tiles, slots, K, most):
    """_slices' choice among 1..most (kept: an eager step asks it again for every product, 20 us each)."""
    cost = lambda s: -(-tiles * s // slots) * (K / (32 * s) + 4)
    return min(range(1, most + 1), key=lambda s: (cost(s), s))


def gemm(M, N, K, a, lda, b, ldb, c, ldc, trans_a=False, trans_b=False, bias=0, beta=0.0, config=CONFIG):
    """Row-major C (M x N) = op(A) op(B) (+ bias (N,)) (+ beta C) in 3xTF32 on device addresses (float32); op(A) is
    M x K (A stored K x M when trans_a), op(B) K x N (stored N x K when trans_b), row strides in elements.
    Launches only (capturable into a CUDA graph). The caller checks supported() first."""
    fn, smem, total, per_sm = _kernel(tuple(config), bool(trans_a), bool(trans_b))
    BM, BN = config[:2]
    S = _slices(M, N, K, config, per_sm)
    kslice = -(-K // (S * 32)) * 32
    S = -(-K // kslice)
    part = 0
    if S > 1:
        dev = cp.cuda.Device().id
        if dev not in _workspace:
            with default_pool():
                _workspace[dev] = cp.empty(WORKSPACE_BYTES // 4, dtype=np.float32)
        part = _workspace[dev].data.ptr
    args = (np.uint64(a), np.uint64(b), np.uint64(c), np.int32(M), np.int32(N), np.int32(K), np.int64(lda),
            np.int64(ldb), np.int64(ldc))
    fn((-(-N // BN), -(-M // BM), S), (256,), args + (np.uint64(bias), np.float32(beta), np.int32(kslice),
                                                      np.uint64(part)), shared_mem=smem)
    if S > 1:
        n4 = M * N // 4
        total((-(-n4 // 256),), (256,), (np.uint64(part), np.uint64(c), np.int32(M), np.int32(N), np.int64(ldc),
                                         np.uint64(bias), np.float32(beta), np.int32(S)))
