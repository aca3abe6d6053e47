"""Flash attention on the tensor cores: bf16, TF32 or 3xTF32 products, float32 sums (derivation:
docs/backward/flash_attention.md; the C++ in flash_mma_common.py, flash_mma_bf16.py and flash_mma_tf32.py).

The same algorithm as flash_attention.py (an online softmax forward keeping only y and each row's
log-sum-exp; a backward that recomputes the probabilities tile by tile, one block per key tile, dQ added
atomically into float32 sums zeroed by the pass that computes rowsum(dy * y): dq itself when it is float32),
with every tile product on the tensor cores: the warp-level `mma.sync` instruction with float32
accumulators, m16n8k16 on bf16 operands fed from shared memory by `ldmatrix`, or m16n8k8 on tf32 operands
(KINDS: "tf32" rounds float32 q, k, v to tf32; "float32" splits each operand x into tf32 parts hi + lo and
multiplies a_lo b_hi + a_hi b_lo + a_hi b_hi, "3xTF32", float32's accuracy). A block is 4 warps; each warp
owns 16 rows of a 64-row tile (queries forward, keys backward). The scores' accumulator fragments are laid out
as the next product's operand fragments (bf16 directly; tf32 by taking each 8-wide k block in the order 2t, 2t + 1,
flash_mma_common.py's sw32), so P (forward), Pd and dS (backward) become operands without touching shared memory
or moving between lanes; only dS^T is written to shared memory once per tile pair, for dQ. The bf16 kernels copy
each step's next tile (forward: k and v; backward: q, dy's bf16 bits, L and D, written by the first pass) into a
second shared-memory buffer with cp.async while this step's is multiplied, and with dropout the forward can store
the mask as bits (keep_bits_for) for the backward to read instead of hashing every element again.

Numbers (bf16 kind): q, k, v are bf16 (the products' operands under precision.py's bf16 policy); S, the
softmax, the log-sum-exp, dPd - D and every accumulator are float32; P, Pd and dS are rounded to bf16 (round to
nearest even) as the operands of their products, as the cuBLAS bf16 path (mixed.py) rounds them (the tf32
kinds: to tf32, or split). y, dy, dq, dk and dv are float32 ("float32" outputs: the autograd's tensors) or,
for the bf16 kind, bf16 ("bfloat16": bf16 in and out, as a bf16 framework's attention). Head sizes:
HEAD_SIZES; every row 16-byte aligned (supported() checks the pointers and strides). Dropout: the same element
index and hash as every other attention path (flash_attention.py's docstring), so one seed gives one mask.

Launches only: nothing allocated inside forward/backward and no sync, so they capture in a CUDA graph.
"""
import os

import cupy as cp
import numpy as np

from . import flash_mma_bf16, flash_mma_common, flash_mma_tf32
from .cublas import compute_type
from .flash_attention import Layout, _pointers
from .flash_kernels import SOURCE as _FLASH_SOURCE

# TINYGRAD_LLM_FLASH_MMA (read at import, or set MMA): "1" (default): attention under bf16 autocast
# (mixed.SelfAttentionBF16Cuda), float32 attention with TF32 on, and float32 attention where flash attention is
# picked (attention.SelfAttentionCuda: "tf32" and "float32" kinds) run these kernels wherever they take the
# heads (supported()), keeping no (T, T) array; "0": never (the cuBLAS products around the softmax passes, or
# flash_attention.py's CUDA-core kernels where that path's rule picks flash).
MMA = os.environ.get("TINYGRAD_LLM_FLASH_MMA", "1")
HEAD_SIZES = (32, 64)     # exact: the head size is a template argument (no padding)
# what the products take: "bfloat16" q, k, v (bf16 bits; m16n8k16); "tf32": float32 q, k, v rounded to tf32
# (m16n8k8); "float32": float32 q, k, v split as hi + lo tf32 parts, three tf32 products for each (a_lo b_hi +
# a_hi b_lo + a_hi b_hi, "3xTF32"), float32's accuracy on the tensor cores (the dropped a_lo b_lo is under 2^-22
# of the product)
KINDS = ("bfloat16", "tf32", "float32")
TILE = 64                 # queries (forward) or keys (backward) a block; 16 a warp
THREADS = 128
KEEP_BLOCK = 128          # words of the stored dropout mask a (query tile, key tile) pair: a bit an element
OUTPUTS = {"float32": "float", "bfloat16": "unsigned short"}

SOURCE = _FLASH_SOURCE + flash_mma_common.SOURCE + flash_mma_bf16.SOURCE + flash_mma_tf32.SOURCE
_modules = {}


def shared_bytes(name, HD, tf32=False, split=False):
    """Dynamic shared memory of a kernel: 64-row tiles of bf16 or tf32 words (row stride HD + 8; split, 3xTF32:
    two, the hi and the lo words), plus backward's dS^T tile and its 64 log-sum-exps and D values. The bf16
    kernels hold two buffers of what each step loads (forward: k and v; backward: q, dy, the log-sum-exps and D),
    one filled while the other is read."""
    tile = TILE * (HD + 8) * (4 if tf32 else 2) * (2 if split else 1)
    square = TILE * (TILE + 8) * (4 if tf32 else 2)
    if tf32:
        return 3 * tile if name == "forward" else 4 * tile + square + 2 * TILE * 4
    return 5 * tile if name == "forward" else 2 * tile + square + 2 * (2 * tile + 2 * TILE * 4 + KEEP_BLOCK * 4)


def _kernels(kind, output, HD):
    """{name: (function, shared bytes)} for the kind (KINDS), the output storage and the head size, compiled on
    first use."""
    key = (kind, output, HD)
    if key not in _modules:
        ctype, tf32 = OUTPUTS[output], kind != "bfloat16"
        if tf32:
            split = "true" if kind == "float32" else "false"
            exprs = {"forward": f"tf32_flash_forward<{HD}, {split}>", "backward": f"tf32_flash_backward<{HD}, {split}>"}
        else:
            exprs = {"forward": f"mma_flash_forward<{ctype}, {HD}>",
                     "backward": f"mma_flash_backward<{ctype}, {HD}, false>",
                     "backward_bits": f"mma_flash_backward<{ctype}, {HD}, true>"}
        exprs.update(rowdot=f"mma_rowdot_zero<{ctype}, {HD}>", dq_store=f"flash_dq_store<{ctype}>")
        module = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=list(exprs.values()))
        found = {}
        for name, expr in exprs.items():
            fn, smem = module.get_function(expr), 0
            if name in ("forward", "backward", "backward_bits"):
                smem = shared_bytes(name.split("_")[0], HD, tf32, split=kind == "float32")
                fn.max_dynamic_shared_size_bytes = smem
            found[name] = (fn, smem)
        _modules[key] = found
    return _modules[key]


def keep_bits_words(B, NH, T):
    """uint32 words of the bf16 kernels' stored dropout mask for B NH heads of T rows: a KEEP_BLOCK-word block for
    every pair of 64-row tiles (T^2 / 8 bytes a head; with a causal mask the pairs above the diagonal go unused)."""
    tiles = -(-T // TILE)
    return B * NH * tiles * tiles * KEEP_BLOCK


def keep_bits_for(qkv_bits, n_head, dropout_p):
    """A new array for the bf16 forward to store its dropout mask in, so that the backward reads the mask instead of
    hashing every element again; or None (no dropout, or T > 16 HS: the mask would pass a third of the bf16 qkv's
    bytes, T / (48 HS) of them, and long sequences keep attention's memory linear in T)."""
    B, T, C3 = qkv_bits.shape
    if not 0.0 < dropout_p < 1.0 or T > 16 * (C3 // 3 // n_head):
        return None
    return cp.empty(keep_bits_words(B, n_head, T), dtype=np.uint32)


def enabled():
    """MMA, checked: True for "1", False for "0", a clear error naming the variable for anything else."""
    mode = str(MMA).strip()
    if mode not in ("1", "0"):
        raise ValueError(f"TINYGRAD_LLM_FLASH_MMA must be 1 or 0, got {MMA!r}")
    return mode == "1"


def supported(HS, pointers=(), strides=(), output="float32", kind="bfloat16"):
    """True when the `kind` kernels (KINDS) take heads of size HS whose inputs and `output` arrays start at
    `pointers` (byte addresses) with `strides` (element strides): every row of a head must start 16 bytes
    aligned (the tiles load 16 bytes a thread). The tf32 and float32 kinds write float32 only."""
    if HS not in HEAD_SIZES or output not in OUTPUTS or kind not in KINDS:
        return False
    if kind != "bfloat16" and output != "float32":
        return False
    return all(int(p) % 16 == 0 for p in pointers) and all(int(s) % 8 == 0 for s in strides)


def packed_supported(qkv, n_head, output="float32", kind=None):
    """supported() for the packed (B, T, 3C) qkv (C-contiguous: uint16 bf16 bits, or float32) and (B, T, C)
    outputs; kind (default: _kind(qkv)) must suit qkv's dtype."""
    B, T, C3 = qkv.shape
    C, kind = C3 // 3, kind or _kind(qkv)
    if (qkv.dtype == np.uint16) != (kind == "bfloat16") or qkv.dtype not in (np.uint16, np.float32):
        return False
    return (C % n_head == 0 and (kind == "bfloat16" or B * n_head <= 65535)   # tf32: (b, h) is the grid's y
            and supported(C // n_head, (qkv.data.ptr,), (C3, C), output, kind))


def tf32_on():
    """True while float32 products run in TF32 (backend.set_tf32, CuPy's compute type)."""
    from cupy.cuda import cublas
    return compute_type(np.float32) == cublas.CUBLAS_COMPUTE_32F_FAST_TF32


def float32_kind(qkv, n_head, flash):
    """The kind attention.SelfAttentionCuda takes for a packed qkv, or None: for float32, "tf32" while TF32 is on
    (the cuBLAS path would multiply in TF32 too), else "float32" (3xTF32) where flash attention is picked
    (`flash`: use_flash's answer); where these kernels take the heads and MMA allows. (Without dropout 3xTF32
    beat the cuBLAS path at every T measured, 64 to 2048; the 6x384 step with attention dropout 0.2 ran 0.5 ms
    slower with it: benchmarks/RESULTS.md.)"""
    if qkv.dtype != np.float32 or not enabled():
        return None
    kind = "tf32" if tf32_on() else "float32" if flash else None
    return kind if kind and packed_supported(qkv, n_head, kind=kind) else None


def _layout(B, NH, T, HS, inputs, outputs):
    return Layout("bfloat16", B, NH, T, HS, inputs, outputs)


def forward(layout, q, k, v, y, lse, causal=True, scale=1.0, seed=0, dropout_p=0.0, seed_ptr=0, output="float32",
            kind="bfloat16", y_bf16=0, keep_bits=0):
    """y (layout's output strides, `output` storage) and lse (B NH T float32) from q, k, v (pointers to bf16
    for kind bfloat16, else to float32); y_bf16 (kind bfloat16, float32 output; 0: none): where y's bf16 bits go,
    with y's strides, written beside y; keep_bits (kind bfloat16 with dropout; 0: none): keep_bits_words words
    (16-byte aligned) that receive the dropout mask, for the backward."""
    fn, smem = _kernels(kind, output, layout.HS)["forward"]
    _check_keep_pointer(keep_bits, kind, dropout_p)
    copy = (y_bf16, keep_bits) if kind == "bfloat16" else ()
    fn(_grid(kind, layout.T, layout.B * layout.NH), (THREADS,),
       layout.args(q, k, v, causal, scale, seed, dropout_p, seed_ptr) + _pointers(y, lse, *copy), shared_mem=smem)


def _grid(kind, T, heads):
    """A block a 64-row tile of a (b, h): the bf16 kernels take (b, h) as x and the tile as y, so that every head's
    longest causal tiles (the last queries forward, the first keys backward) are issued before any shorter one
    and the last wave holds the short ones; the tf32 kernels take (tile, (b, h))."""
    return (heads, -(-T // TILE)) if kind == "bfloat16" else (-(-T // TILE), heads)


def backward(layout, q, k, v, y, dy, lse, D, dq, dk, dv, work, causal=True, scale=1.0, seed=0, dropout_p=0.0,
             seed_ptr=0, output="float32", kind="bfloat16", dy_bf16=0, keep_bits=0):
    """dq, dk, dv (`output` storage, the input strides) from dy and the forward's y and lse; D: scratch of
    B NH T float32 (gets rowsum(dy * y); kind bfloat16: 2 B NH T, the log-sum-exps in base 2 after them); work:
    with bfloat16 outputs, scratch of B NH T HS float32 for dQ's sums (float32 dq is summed into in place; work may
    be None then): its rows must start 16-byte aligned (the sums are added 16 bytes at a time); dy_bf16 (kind
    bfloat16 with float32 outputs): scratch with dy's strides, 16-byte aligned, for dy's bf16 bits (the products'
    operand); keep_bits (kind bfloat16): the mask the forward stored, read instead of the hash. The same arguments
    as the forward, or the mask differs. Launches only: a first pass writes D (and dy's bf16 bits) and zeroes dQ's
    sums, the kernel adds into them, and with bfloat16 outputs a last pass rounds them into dq."""
    found = _kernels(kind, output, layout.HS)
    B, NH, T, HS = layout.B, layout.NH, layout.T, layout.HS
    rows = B * NH * T
    if output == "float32":
        acc, acc_strides = dq, layout.inputs
    elif work is None:
        raise ValueError("flash_mma: backward with bfloat16 outputs needs work, scratch of B NH T HS float32")
    else:
        acc, acc_strides = work, (NH * T * HS, T * HS, HS)
    if int(acc) % 16 or any(int(s) % 4 for s in acc_strides):
        raise ValueError("flash_mma: backward's dQ sums need rows on 16-byte boundaries (pointer % 16, strides % 4)")
    bf16 = kind == "bfloat16"
    copy = bf16 and output == "float32"   # the products read dy's bf16 bits: the first pass writes them
    _check_keep_pointer(keep_bits, kind, dropout_p)
    if copy and (not dy_bf16 or int(dy_bf16) % 16):
        raise ValueError("flash_mma: the bf16 backward with float32 outputs needs dy_bf16, 16-byte aligned scratch "
                         "with dy's strides")
    acc_strides = tuple(np.int64(s) for s in acc_strides)
    threads = rows * (HS // 4)
    found["rowdot"][0]((-(-threads // 256),), (256,), (*_pointers(y, dy, D, acc, dy_bf16 if copy else 0,
                                                                  lse if bf16 else 0), np.int32(NH), np.int32(T),
                                                       *(np.int64(s) for s in layout.outputs), *acc_strides,
                                                       np.int64(rows)))
    fn, smem = found["backward_bits" if keep_bits else "backward"]
    tail = (_pointers(dy_bf16 if copy else dy, D, keep_bits, dk, dv, acc) if bf16   # lse comes in D, in base 2
            else _pointers(dy, lse, D, dk, dv, acc))
    fn(_grid(kind, T, B * NH), (THREADS,),
       layout.args(q, k, v, causal, scale, seed, dropout_p, seed_ptr) + tail + acc_strides, shared_mem=smem)
    if output != "float32":
        n = rows * HS
        found["dq_store"][0]((-(-n // 256),), (256,), (*_pointers(work, dq), np.int32(NH), np.int32(T), np.int32(HS),
                                                       *(np.int64(s) for s in layout.inputs), np.int64(n)))


def _kind(qkv):
    """The kind a qkv's dtype takes by default: bfloat16 for uint16 bits, tf32 for float32."""
    return "bfloat16" if qkv.dtype == np.uint16 else "tf32"


def self_attention_forward(qkv, n_head, causal, scale, seed, dropout_p, seed_ptr=0, output="float32", kind=None,
                           y_bf16=None, keep_bits=None):
    """The packed (B, T, 3C) qkv (a C-contiguous CuPy array: uint16 bf16 bits, or float32) -> (y (B, T, C) of
    `output` (uint16 bits for bfloat16), lse (B NH T float32)); kind (KINDS) defaults to _kind(qkv). y_bf16: a
    C-contiguous (B, T, C) uint16 array that receives y's bf16 bits in the same pass (bf16 kind, float32 y).
    keep_bits: keep_bits_for's array (bf16 kind, dropout), which receives the mask for the backward."""
    B, T, C3 = qkv.shape
    C, kind = C3 // 3, kind or _kind(qkv)
    layout, size = _layout(*_packed(B, T, C, n_head)), qkv.dtype.itemsize
    y = cp.empty((B, T, C), dtype=np.float32 if output == "float32" else np.uint16)
    lse = cp.empty(B * n_head * T, dtype=np.float32)
    p = qkv.data.ptr
    if y_bf16 is not None and (kind != "bfloat16" or output != "float32" or y_bf16.shape != y.shape
                               or y_bf16.dtype != np.uint16 or not y_bf16.flags.c_contiguous or y_bf16.data.ptr % 4):
        raise ValueError(f"flash_mma: y_bf16 must be a C-contiguous uint16 array of shape {y.shape} on a 4-byte "
                         f"boundary, for the bf16 kind's float32 output")
    _check_keep_bits(keep_bits, B, n_head, T)
    forward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, lse.data.ptr, causal, scale, seed, dropout_p,
            seed_ptr, output, kind, 0 if y_bf16 is None else y_bf16.data.ptr,
            0 if keep_bits is None else keep_bits.data.ptr)
    return y, lse


def self_attention_backward(qkv, y, lse, dy, n_head, causal, scale, seed, dropout_p, seed_ptr=0, output="float32",
                            kind=None, keep_bits=None):
    """dqkv (B, T, 3C) of `output` from the forward's qkv, y, lse and dy (B, T, C) of `output`, contiguous; the
    forward's kind; keep_bits: the array the forward stored the mask in (else the mask is hashed again)."""
    B, T, C3 = qkv.shape
    C, kind = C3 // 3, kind or _kind(qkv)
    layout, size = _layout(*_packed(B, T, C, n_head)), qkv.dtype.itemsize
    out_size = 4 if output == "float32" else 2
    dqkv = cp.empty((B, T, C3), dtype=np.float32 if output == "float32" else np.uint16)
    D = cp.empty(lse.size * (2 if kind == "bfloat16" else 1), dtype=np.float32)
    work = None if output == "float32" else cp.empty(lse.size * (C // n_head), dtype=np.float32)
    dy_bf16 = cp.empty(dy.shape, dtype=np.uint16) if kind == "bfloat16" and output == "float32" else None
    p, g = qkv.data.ptr, dqkv.data.ptr
    _check_keep_bits(keep_bits, B, n_head, T)
    backward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, dy.data.ptr, lse.data.ptr, D.data.ptr, g,
             g + C * out_size, g + 2 * C * out_size, None if work is None else work.data.ptr, causal, scale, seed,
             dropout_p, seed_ptr, output, kind, 0 if dy_bf16 is None else dy_bf16.data.ptr,
             0 if keep_bits is None else keep_bits.data.ptr)
    return dqkv


def _check_keep_pointer(keep_bits, kind, dropout_p):
    """forward's and backward's refusal of a keep_bits pointer (0: none) where no mask is stored or read."""
    if keep_bits and (kind != "bfloat16" or not dropout_p or int(keep_bits) % 16):
        raise ValueError("flash_mma: keep_bits is for the bf16 kind with dropout, 16-byte aligned")


def _check_keep_bits(keep_bits, B, NH, T):
    """A clear error for a mask array that is not keep_bits_words(B, NH, T) contiguous uint32 words."""
    if keep_bits is not None and (keep_bits.dtype != np.uint32 or keep_bits.size != keep_bits_words(B, NH, T)
                                  or not keep_bits.flags.c_contiguous):
        raise ValueError(f"flash_mma: keep_bits must be {keep_bits_words(B, NH, T)} contiguous uint32 words "
                         f"(keep_bits_for), got {keep_bits.dtype} of size {keep_bits.size}")


def _packed(B, T, C, NH):
    """Layout arguments of a packed qkv: q, k, v column blocks of (B, T, 3C); y, dy (B, T, C)."""
    HS = C // NH
    return B, NH, T, HS, (T * 3 * C, HS, 3 * C), (T * C, HS, C)
