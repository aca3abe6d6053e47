"""Attention that never stores the (T, T) probabilities (flash-attention style): one pass over the key
tiles with an online softmax forward, keeping only the output and each row's log-sum-exp, and a
backward that recomputes the probabilities tile by tile (derivation: docs/backward/flash_attention.md).

The kernels take raw device pointers, element strides and a storage name ("float32", "float64",
"bfloat16"), so any array type that holds those bits works: bfloat16 is read and written as 16-bit
words (round to nearest even, the rounding of cuda_bf16.h's __float2bfloat16) and computed in float32;
float64 is computed in float64. q, k, v may be views into one packed (B, T, 3C) qkv: element (b, h, t, d)
of q is q[b sb + h sh + t st + d]; the output and its gradient use (ob, oh, ot); dq, dk, dv the input's.
Attention dropout keeps element (b, h, i, j) when runtime.HEADER's dropout_keep(seed, ((b NH + h) T + i) T
+ j) says so: the index of attention.py's softmax passes, so both paths draw one mask from one seed.

A block of 256 threads (16 x 16) owns a tile; every product is a register-blocked FMA loop over
shared-memory tiles (16-byte shared loads), no tensor cores. Backward: rowsum(dy * y) first, then one
block per key tile (dK, dV; it loops over the query tiles that see it) which also adds its part of dQ
atomically into a zeroed scratch (FUSED_DQ), or, for bitwise-reproducible results, a second kernel with
one block per query tile that recomputes the scores to sum dQ itself. The launchers allocate nothing and
never sync (the memset of the scratch is a stream operation): the launches capture in a CUDA graph.
"""
import os

import cupy as cp
import numpy as np

from .flash_kernels import SOURCE

STORAGE = {"float32": ("float", np.float32), "float64": ("double", np.float64), "bfloat16": ("unsigned short", np.float32)}
HEAD_SIZES = (16, 32, 64, 128)   # the head size is padded up to one of these (zeros past HS)
MAX_HEAD_SIZE = HEAD_SIZES[-1]
# dQ in the dK/dV kernel, added atomically into a zeroed scratch (float order varies from run to run), or in
# a kernel of its own that recomputes the scores and dPd (bitwise reproducible, 7 tile products instead of 5).
# TINYGRAD_LLM_FLASH_DQ = "fused" (default) or "separate"; see benchmarks/RESULTS.md, "Flash attention".
FUSED_DQ = os.environ.get("TINYGRAD_LLM_FLASH_DQ", "fused") != "separate"
_modules = {}


def tiles(storage, HD):
    """{kernel: (BQ, BK)}: what fits 227 KiB of shared memory (the forward: 2 blocks a multiprocessor at
    HD 64 in float32); float64 takes half tiles."""
    if storage == "float64":
        bq = bk = kv_q = 32
    else:
        bq, bk, kv_q = 64, 64, 64 if HD <= 64 else 32
    return {"flash_forward": (bq, bk), "flash_backward_kv": (kv_q, bk), "flash_backward_fused": (kv_q, bk),
            "flash_backward_q": (bq, bk)}


def shared_bytes(name, storage, HD, BQ, BK):
    LD, size = HD + 4, np.dtype(STORAGE[storage][1]).itemsize
    kv = 2 * BK * LD + 2 * BQ * LD + 2 * HD * (BQ + 4) + BK * (BQ + 4) + 2 * BQ
    words = {"flash_forward": BQ * LD + HD * (BK + 4) + BK * LD + BQ * (BK + 4), "flash_backward_kv": kv,
             "flash_backward_fused": kv, "flash_backward_q": 2 * BQ * LD + BK * LD + 2 * HD * (BK + 4) + BQ * (BK + 4)}
    return words[name] * size


def _kernel(name, storage, HS):
    """(kernel, BQ, BK, shared bytes) for `name` at head size HS (padded), compiled on first use."""
    HD = next(h for h in HEAD_SIZES if h >= HS)
    key = (storage, HD)
    if key not in _modules:
        ctype = STORAGE[storage][0]
        exprs = {n: f"{n}<{ctype}, {HD}, {bq}, {bk}>" for n, (bq, bk) in tiles(storage, HD).items()}
        exprs["flash_backward_kv"] = exprs["flash_backward_kv"][:-1] + ", false>"
        exprs["flash_backward_fused"] = exprs.pop("flash_backward_fused").replace("_fused", "_kv")[:-1] + ", true>"
        small = {n: f"{n}<{ctype}>" for n in ("flash_rowdot", "flash_dq_store")}
        module = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=[*exprs.values(), *small.values()])
        found = {n: (module.get_function(e), 0, 0, 0) for n, e in small.items()}
        for n, (bq, bk) in tiles(storage, HD).items():
            fn = module.get_function(exprs[n])
            smem = shared_bytes(n, storage, HD, bq, bk)
            fn.max_dynamic_shared_size_bytes = smem
            found[n] = (fn, bq, bk, smem)
        _modules[key] = found
    return _modules[key][name]


class Layout:
    """Where the heads are: B, NH, T, HS, the input strides (sb, sh, st) of q, k, v (and dq, dk, dv) and
    the output strides (ob, oh, ot) of y (and dy), all in elements; storage names the element type."""

    def __init__(self, storage, B, NH, T, HS, inputs, outputs):
        if storage not in STORAGE:
            raise ValueError(f"flash attention: storage must be one of {sorted(STORAGE)}, got {storage!r}")
        if not 0 < HS <= MAX_HEAD_SIZE:
            raise ValueError(f"flash attention: head size must be in 1..{MAX_HEAD_SIZE}, got {HS}")
        self.storage, self.B, self.NH, self.T, self.HS = storage, int(B), int(NH), int(T), int(HS)
        self.inputs, self.outputs = tuple(int(s) for s in inputs), tuple(int(s) for s in outputs)
        self.math = STORAGE[storage][1]

    @classmethod
    def packed(cls, storage, B, T, NH, HS):
        """q, k, v as column blocks of one (B, T, 3C) qkv; y and dy (B, T, C)."""
        C = NH * HS
        return cls(storage, B, NH, T, HS, (T * 3 * C, HS, 3 * C), (T * C, HS, C))

    def args(self, q, k, v, causal, scale, seed, dropout_p, seed_ptr=0):
        """The arguments every flash kernel starts with (flash_kernels.py's FLASH_ARGS), in order."""
        math = self.math
        return (*_pointers(q, k, v), np.int32(self.NH), np.int32(self.T), np.int32(self.HS),
                *(np.int64(s) for s in self.inputs + self.outputs), math(scale), np.int32(bool(causal)),
                np.uint64(seed_ptr), np.uint64(seed), np.float32(dropout_p),
                math(1 / (1 - dropout_p) if dropout_p < 1 else 0), np.int32(dropout_p > 0))

    def launch(self, name, args):
        fn, bq, bk, smem = _kernel(name, self.storage, self.HS)
        tile = bk if name.startswith("flash_backward_kv") or name == "flash_backward_fused" else bq
        fn((-(-self.T // tile), self.B * self.NH), (256,), args, shared_mem=smem)


def _pointers(*addresses):
    return tuple(np.uint64(a) for a in addresses)


def forward(layout, q, k, v, y, lse, causal=True, scale=1.0, seed=0, dropout_p=0.0, seed_ptr=0):
    """y = attention(q, k, v) and lse (B NH T, in the math dtype) = each row's log-sum-exp of its scaled
    scores: pointers (ints) laid out as `layout` says. Launches only: nothing allocated or synced. Dropout
    hashes with seed, or (seed_ptr not 0) with HEADER's dropout_seed(seed_ptr, seed), a base in device memory."""
    layout.launch("flash_forward", layout.args(q, k, v, causal, scale, seed, dropout_p, seed_ptr) + _pointers(y, lse))


def backward(layout, q, k, v, y, dy, lse, D, dq, dk, dv, causal=True, scale=1.0, seed=0, dropout_p=0.0, work=None,
             seed_ptr=0):
    """dq, dk, dv (each written whole) from dy and the forward's y and lse; D is scratch of B NH T elements
    of the math dtype (it gets rowsum(dy * y)); with FUSED_DQ, work is scratch of B NH T HS of them (dQ's
    sums; zeroed here). The same arguments as the forward, or the mask differs. Launches only."""
    rows = layout.B * layout.NH * layout.T
    shape = (np.int32(layout.NH), np.int32(layout.T), np.int32(layout.HS))
    rowdot = _kernel("flash_rowdot", layout.storage, layout.HS)[0]
    rowdot((-(-rows * 32 // 256),), (256,), (*_pointers(y, dy, D), *shape, *(np.int64(s) for s in layout.outputs),
                                            np.int64(rows)))
    args = layout.args(q, k, v, causal, scale, seed, dropout_p, seed_ptr)
    if not FUSED_DQ:
        layout.launch("flash_backward_kv", args + _pointers(dy, lse, D, dk, dv, 0))
        layout.launch("flash_backward_q", args + _pointers(dy, lse, D, dq))
        return
    if work is None:
        raise ValueError("flash attention: backward with FUSED_DQ needs work, scratch of B NH T HS elements")
    n = rows * layout.HS
    cp.cuda.runtime.memsetAsync(int(work), 0, n * np.dtype(layout.math).itemsize, cp.cuda.get_current_stream().ptr)
    layout.launch("flash_backward_fused", args + _pointers(dy, lse, D, dk, dv, work))
    store = _kernel("flash_dq_store", layout.storage, layout.HS)[0]
    store((-(-n // 256),), (256,), (*_pointers(work, dq), *shape, *(np.int64(s) for s in layout.inputs), np.int64(n)))


def self_attention_forward(qkv, n_head, causal, scale, seed, dropout_p, storage=None, seed_ptr=0):
    """The packed (B, T, 3C) qkv (a contiguous CuPy array) -> (y (B, T, C), lse): the op's forward."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // n_head
    storage = storage or np.dtype(qkv.dtype).name
    layout = Layout.packed(storage, B, T, n_head, HS)
    y = cp.empty((B, T, C3 // 3), dtype=qkv.dtype)
    lse = cp.empty(B * n_head * T, dtype=layout.math)
    size, p = qkv.dtype.itemsize, qkv.data.ptr
    forward(layout, p, p + C3 // 3 * size, p + 2 * C3 // 3 * size, y.data.ptr, lse.data.ptr, causal, scale, seed, dropout_p,
            seed_ptr)
    return y, lse


def self_attention_backward(qkv, y, lse, dy, n_head, causal, scale, seed, dropout_p, storage=None, seed_ptr=0):
    """dqkv (B, T, 3C) from the forward's qkv, y, lse and dy (B, T, C), all contiguous CuPy arrays."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // n_head
    layout = Layout.packed(storage or np.dtype(qkv.dtype).name, B, T, n_head, HS)
    dqkv = cp.empty_like(qkv)
    D = cp.empty_like(lse)
    work = cp.empty(lse.size * HS, dtype=lse.dtype) if FUSED_DQ else None
    size, p, g = qkv.dtype.itemsize, qkv.data.ptr, dqkv.data.ptr
    C = C3 // 3
    backward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, dy.data.ptr, lse.data.ptr, D.data.ptr,
             g, g + C * size, g + 2 * C * size, causal, scale, seed, dropout_p, None if work is None else work.data.ptr,
             seed_ptr)
    return dqkv


def to_bfloat16_bits(x):
    """float32 CuPy array -> uint16 array of its bfloat16 bits (round to nearest even; NaN stays NaN)."""
    u = cp.ascontiguousarray(x, dtype=cp.float32).view(cp.uint32)
    rounded = ((u + cp.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(cp.uint16)
    return cp.where((u & 0x7FFFFFFF) > 0x7F800000, cp.uint16(0x7FC0), rounded)


def from_bfloat16_bits(b):
    """uint16 array of bfloat16 bits -> float32 array (exact)."""
    return (cp.ascontiguousarray(b).astype(cp.uint32) << 16).view(cp.float32)
