"""Each Numba kernel against its op on edge cases: random and odd shapes, strided inputs, inputs the
kernel leaves to the op, and knobs turned (row blocks, threads, the erf GELU). One `check_<family>()`
per kernel file returns the largest relative difference over outputs and gradients; float64 must
agree to rounding, float32 to 2e-4 (the kernels may order their sums differently from NumPy's).
Also the input makers benchmarks/kernels.py times on.
"""
import contextlib
import math

import numpy as np

from tinygrad_llm import functional as F
from tinygrad_llm.kernels.cpu import attention, threads
from tinygrad_llm.kernels.cpu.attention import ScaledDotProductAttentionNumba
from tinygrad_llm.kernels.cpu.cross_entropy import CrossEntropyNumba
from tinygrad_llm.kernels.cpu.elementwise import GELUNumba, SwiGLUNumba, exact_served
from tinygrad_llm.kernels.cpu.embedding import EmbeddingNumba
from tinygrad_llm.kernels.cpu.layer_norm import LayerNormNumba, RMSNormNumba
from tinygrad_llm.kernels.cpu.optim import adamw_update_group_numba, adamw_update_numba
from tinygrad_llm.optim import adamw_update, adamw_update_group
from tinygrad_llm.tensor import Context

TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-4}


def relative_error(a, b):
    """max |a - b| / max(|b|, tiny): one number per array pair, robust to zeros in b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-30)
    return float(np.abs(a - b).max()) / scale if a.size else 0.0


def compare_with_reference(reference, kernel, arrays, attrs=None, needs=None, seed=0):
    """Run reference and kernel forward and backward on `arrays`; the largest relative difference.

    needs: needs_input_grad per array (default: the floating ones). Both backwards see one random dout.
    """
    attrs = attrs or {}
    if needs is None:
        needs = tuple(a is not None and hasattr(a, "dtype") and a.dtype.kind == "f" for a in arrays)
    ctx_ref, ctx_ker = Context(needs), Context(needs)
    out_ref = reference.forward(ctx_ref, *arrays, **attrs)
    out_ker = kernel.forward(ctx_ker, *arrays, **attrs)
    if out_ker.dtype != out_ref.dtype:
        raise AssertionError(f"{kernel.__name__}: output dtype {out_ker.dtype}, reference {out_ref.dtype}")
    errors = [relative_error(out_ker, out_ref)]
    dout = np.random.default_rng(seed + 1).standard_normal(out_ref.shape).astype(out_ref.dtype)
    grads_ref, grads_ker = reference.backward(ctx_ref, dout), kernel.backward(ctx_ker, dout)
    # a one-input op may return its gradient bare, as Function.backward allows
    grads_ref = grads_ref if isinstance(grads_ref, tuple) else (grads_ref,)
    grads_ker = grads_ker if isinstance(grads_ker, tuple) else (grads_ker,)
    if len(grads_ref) != len(grads_ker):
        raise AssertionError(f"{kernel.__name__}: {len(grads_ker)} gradients, reference {len(grads_ref)}")
    for i, (g_ref, g_ker) in enumerate(zip(grads_ref, grads_ker)):
        if (g_ref is None) != (g_ker is None):
            raise AssertionError(f"{kernel.__name__}: gradient {i} is {g_ker is None and 'missing' or 'extra'}")
        if g_ref is not None:
            if g_ker.dtype != g_ref.dtype:
                raise AssertionError(f"{kernel.__name__}: gradient {i} dtype {g_ker.dtype}, reference {g_ref.dtype}")
            errors.append(relative_error(g_ker, g_ref))
    return max(errors)


@contextlib.contextmanager
def row_blocks_of(size):
    """Causal row blocks of `size` rows (the last one shorter when it does not divide TQ)."""
    saved = attention.ROW_BLOCKS, attention.MIN_ROW_BLOCK
    attention.ROW_BLOCKS, attention.MIN_ROW_BLOCK = 1 << 30, size
    try:
        yield
    finally:
        attention.ROW_BLOCKS, attention.MIN_ROW_BLOCK = saved


@contextlib.contextmanager
def spread_over_threads(n):
    """Spread the attention work items of every size over n threads."""
    saved = threads.THREADS, attention.PARALLEL_MIN_SCORES
    threads.THREADS, attention.PARALLEL_MIN_SCORES = n, 0
    try:
        yield
    finally:
        threads.THREADS, attention.PARALLEL_MIN_SCORES = saved


# ---- attention ---------------------------------------------------------------------------------------

def attention_inputs(shape, dtype, seed=0, strided=False, TK=None):
    rng = np.random.default_rng(seed)
    B, NH, T, HS = shape
    kv_shape = (B, NH, TK or T, HS)
    if strided:  # the model's layout: (B, T, NH, HS) transposed to (B, NH, T, HS), not contiguous
        q = rng.standard_normal((B, T, NH, HS)).astype(dtype).transpose(0, 2, 1, 3)
    else:
        q = rng.standard_normal(shape).astype(dtype)
    return q, rng.standard_normal(kv_shape).astype(dtype), rng.standard_normal(kv_shape).astype(dtype)


ATTENTION_CASES = [  # (B, NH, T, HS), attributes, strided q, TK
    ((2, 3, 17, 8), dict(causal=True), False, None),
    ((1, 2, 64, 16), dict(causal=True), True, None),
    ((2, 1, 5, 3), dict(causal=False), False, 9),
    ((1, 2, 4, 8), dict(causal=True), False, 11),  # a KV-cache query block: aligned to the end of the keys
    ((1, 1, 1, 1), dict(causal=True), False, None),
    ((2, 2, 7, 4), dict(causal=True, mask=np.tril(np.ones((7, 7), bool))), False, None),  # mask: falls back
]


def check_attention():
    """Every case with the default row blocks, then with blocks of 1, 3 and 5 rows (5 and 3 do not divide
    T = 17 or 64: a short last block; TQ = 4 of TK = 11: blocks offset from the keys)."""
    worst = 0.0
    for dtype, rows in [(np.float64, None), (np.float32, None), (np.float64, 1), (np.float64, 5), (np.float32, 3)]:
        for shape, attrs, strided, TK in ATTENTION_CASES:
            q, k, v = attention_inputs(shape, dtype, strided=strided, TK=TK)
            attrs = dict(attrs, scale=1 / math.sqrt(shape[-1]))
            mask = attrs.pop("mask", None)
            with row_blocks_of(rows) if rows else contextlib.nullcontext():
                err = compare_with_reference(F.ScaledDotProductAttention, ScaledDotProductAttentionNumba, (q, k, v, mask), attrs,
                                             needs=(True, True, True, False))
            assert err <= TOLERANCE[np.dtype(dtype)], f"attention {shape} {attrs} {np.dtype(dtype).name} rows {rows}: {err}"
            worst = max(worst, err)
    # the work items spread over 2 and 3 threads whatever their size (OpenBLAS on one thread each)
    for dtype, n_threads in [(np.float64, 2), (np.float32, 3)]:
        for shape, attrs, strided, TK in ATTENTION_CASES:
            q, k, v = attention_inputs(shape, dtype, strided=strided, TK=TK)
            attrs = dict(attrs, scale=1 / math.sqrt(shape[-1]))
            mask = attrs.pop("mask", None)
            with spread_over_threads(n_threads):
                err = compare_with_reference(F.ScaledDotProductAttention, ScaledDotProductAttentionNumba, (q, k, v, mask), attrs,
                                             needs=(True, True, True, False))
            assert err <= TOLERANCE[np.dtype(dtype)], f"attention {shape} {attrs} threads {n_threads}: {err}"
            worst = max(worst, err)
    return worst


# ---- cross-entropy -----------------------------------------------------------------------------------

def cross_entropy_inputs(shape, dtype, seed=0, ignore_fraction=0.2, large=False):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape).astype(dtype) * (1e4 if large else 3)
    targets = rng.integers(0, shape[-1], shape[:-1])
    targets[rng.random(shape[:-1]) < ignore_fraction] = -100
    return logits, targets


CROSS_ENTROPY_CASES = [((4, 9, 65), {}), ((7, 3), {}), ((1, 1), {}), ((5, 13), dict(large=True)),
                    ((3, 6), dict(ignore_fraction=1.0)), ((2, 3, 11), dict(ignore_fraction=0.0))]


def check_cross_entropy():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape, kwargs in CROSS_ENTROPY_CASES:
            logits, targets = cross_entropy_inputs(shape, dtype, **kwargs)
            for reduction in ("mean", "sum", "none"):
                attrs = dict(ignore_index=-100, reduction=reduction)
                err = compare_with_reference(F.CrossEntropy, CrossEntropyNumba, (logits, targets), attrs)
                assert err <= TOLERANCE[np.dtype(dtype)], f"cross_entropy {shape} {kwargs} {reduction} {np.dtype(dtype).name}: {err}"
                worst = max(worst, err)
    return worst


# ---- elementwise -------------------------------------------------------------------------------------

def elementwise_inputs(shape, dtype, seed=0, strided=False):
    rng = np.random.default_rng(seed)
    draw = lambda: (rng.standard_normal(shape[:-1] + (2 * shape[-1],))[..., ::2] if strided else rng.standard_normal(shape)) * 3
    return draw().astype(dtype), draw().astype(dtype)


ELEMENTWISE_SHAPES = [(3, 7, 11), (1,), (129,), (2, 64)]


@exact_served()
def check_elementwise():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape in ELEMENTWISE_SHAPES:
            for strided in (False, True):
                x, y = elementwise_inputs(shape, dtype, strided=strided)
                x.reshape(-1)[:1] = -9.0  # far left tail: Phi(x) ~ 1e-19
                cases = [(F.GELU, GELUNumba, (x,), dict(approximate="tanh")), (F.GELU, GELUNumba, (x,), dict(approximate="none")),
                         (F.SwiGLU, SwiGLUNumba, (x, y), {}), (F.SwiGLU, SwiGLUNumba, (x, y[..., :1]), {})]  # broadcast: the op
                for reference, kernel, arrays, attrs in cases:
                    err = compare_with_reference(reference, kernel, arrays, attrs)
                    assert err <= TOLERANCE[np.dtype(dtype)], f"{kernel.__name__} {shape} {attrs} {np.dtype(dtype).name}: {err}"
                    worst = max(worst, err)
    return worst


# ---- embedding ---------------------------------------------------------------------------------------

def embedding_inputs(idx_shape, V, C, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, idx_shape), rng.standard_normal((V, C)).astype(dtype)


EMBEDDING_CASES = [((4, 9), 65, 16), ((3,), 2, 33), ((1, 1), 1, 1), ((2, 50), 5, 128)]  # many repeats


def check_embedding():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for idx_shape, V, C in EMBEDDING_CASES:
            idx, w = embedding_inputs(idx_shape, V, C, dtype)
            err = compare_with_reference(F.Embedding, EmbeddingNumba, (idx, w), needs=(False, True))
            assert err <= TOLERANCE[np.dtype(dtype)], f"embedding {idx_shape} {V}x{C} {np.dtype(dtype).name}: {err}"
            worst = max(worst, err)
    return worst


# ---- layer_norm ------------------------------------------------------------------------------------

def norm_inputs(shape, dtype, seed=0, strided=False):
    rng = np.random.default_rng(seed)
    C = shape[-1]
    x = rng.standard_normal(shape[:-1] + (2 * C,)).astype(dtype)[..., ::2] if strided else rng.standard_normal(shape).astype(dtype)
    return x * 3 + 1, rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)


NORM_SHAPES = [(2, 5, 7), (3, 128), (1, 1), (4, 1, 33), (17,)]


def check_layer_norm():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape in NORM_SHAPES:
            for strided in (False, True):
                x, w, b = norm_inputs(shape, dtype, strided=strided)
                cases = [(F.LayerNorm, LayerNormNumba, (x, w, b), dict(eps=1e-5)),
                         (F.LayerNorm, LayerNormNumba, (x, None, None), dict(eps=1e-5)),
                         (F.RMSNorm, RMSNormNumba, (x, w), dict(eps=1e-6)),
                         (F.RMSNorm, RMSNormNumba, (x, None), dict(eps=1e-6))]
                if dtype == np.float32 and shape[-1] == 1:
                    # rms_norm over one element: dx = rstd dxhat (1 - xhat^2) with xhat^2 = 1 - eps/x^2, pure
                    # cancellation; two float32 evaluation orders differ in the leading digit (float64 agrees)
                    cases = cases[:2]
                for reference, kernel, arrays, attrs in cases:
                    err = compare_with_reference(reference, kernel, arrays, attrs)
                    assert err <= TOLERANCE[np.dtype(dtype)], f"{kernel.__name__} {shape} {np.dtype(dtype).name}: {err}"
                    worst = max(worst, err)
    return worst


# ---- optim -------------------------------------------------------------------------------------------

def adamw_state(shape, dtype, seed):
    """p, m, v as after some steps (v >= 0)."""
    rng = np.random.default_rng(seed)
    p, m = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    return p, m, rng.random(shape).astype(dtype)


def check_optim():
    """Three steps of kernel vs reference on random and odd shapes; the largest relative difference."""
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape in [(1,), (7, 13), (384, 1536), (3, 5, 2)]:
            ours, ref = adamw_state(shape, dtype, 0), adamw_state(shape, dtype, 0)
            for step in (1, 2, 3):
                g = np.random.default_rng(step).standard_normal(shape).astype(dtype)
                adamw_update_numba(ours[0], g, ours[1], ours[2], 3e-3, 0.9, 0.95, 1e-8, 0.1, step)
                adamw_update(ref[0], g, ref[1], ref[2], 3e-3, 0.9, 0.95, 1e-8, 0.1, step)
            for a, b in zip(ours, ref):
                err = relative_error(a, b)
                assert err <= TOLERANCE[np.dtype(dtype)], f"adamw {shape} {np.dtype(dtype).name}: {err}"
                worst = max(worst, err)
        # a group of more than one chunk, odd shapes among them; and a strided gradient (the reference serves it)
        for shapes, strided in [([(7, 13), (1,), (3, 5, 2), (0,)] * 9, False), ([(4, 6), (5,)], True)]:
            ours, ref = ([adamw_state(shape, dtype, i) for i, shape in enumerate(shapes)] for _ in range(2))
            for step in (1, 2, 3):
                rng = np.random.default_rng(step)
                gs = [rng.standard_normal(shape + (2,) if strided else shape).astype(dtype) for shape in shapes]
                gs = [g[..., 0] for g in gs] if strided else gs
                for update, states in ((adamw_update_group_numba, ours), (adamw_update_group, ref)):
                    ps, ms, vs = (list(arrays) for arrays in zip(*states))
                    update(ps, gs, ms, vs, 3e-3, 0.9, 0.95, 1e-8, 0.1, step)
            for state_ours, state_ref in zip(ours, ref):
                for a, b in zip(state_ours, state_ref):
                    err = relative_error(a, b)
                    assert err <= TOLERANCE[np.dtype(dtype)], f"adamw group {a.shape} {np.dtype(dtype).name}: {err}"
                    worst = max(worst, err)
    return worst


def check_matmul():
    """The blocked Numba matmuls that benchmarks/numba_matmul.py measures against BLAS (not served)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import numba_matmul
    return numba_matmul.check(relative_error, TOLERANCE)


CHECKS = {"attention": check_attention, "cross_entropy": check_cross_entropy, "elementwise": check_elementwise,
          "embedding": check_embedding, "layer_norm": check_layer_norm, "matmul": check_matmul, "optim": check_optim}
