"""GELU (tanh form and exact erf form) and SwiGLU on NumPy arrays, forward and backward, in one to three
passes (ops: functional.GELU, functional.SwiGLU); and large same-shape adds spread over threads (tensor.Add).

The ops evaluate a NumPy expression per operation and save a second array (tanh(u), Phi(x) or
sigmoid(gate)) for backward. Here the exact form and SwiGLU save only their inputs and backward
recomputes the transcendental in the pass that forms the gradient. Constants are passed in the input's
dtype, so float32 work stays float32, as in NumPy.

Numba's tanh is a scalar libm call and NumPy's a SIMD loop, so the float64 tanh form runs three passes
(Numba forms u, np.tanh(u) in place, Numba forms the output); in float32 one Numba pass forms u, tanh(u)
by a rational function (_tanh_float32: arithmetic only, so LLVM vectorises it) and the output. The
rational tanh is within 6.4 ulp (np.tanh: 1.4), so for x below about -3, where 1 + t cancels, the float32
output carries a few times the op's relative error, a tiny absolute one. t = tanh(u) is kept for
backward, as the op keeps it.

The exact (erf) form's kernel (libm's erf per element) lost to the op's vectorised erf series, so it is
not served (SERVE_EXACT = False) but kept measured (benchmarks/kernels.py). The model's default is the
tanh form. Figures: benchmarks/RESULTS.md.
"""
import contextlib
import math

import numpy as np
from numba import njit

from ...functional import GELU, SwiGLU
from ...tensor import Add
from . import threads


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def gelu_tanh_argument(x, u, c, a):
    """u = c (x + a x^3), c = sqrt(2/pi), a = 0.044715; x, u flat. np.tanh then runs in place on u."""
    for i in range(x.shape[0]):
        xi = x[i]
        u[i] = c * (xi + a * xi * xi * xi)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def gelu_tanh_forward(x, t, out, half, one):
    """out = 0.5 x (1 + t), t = tanh(u)."""
    for i in range(x.shape[0]):
        out[i] = half * x[i] * (one + t[i])


# tanh(u) = u P(u^2) / Q(u^2) for |u| < TANH_LIMIT, +-1 beyond. Our fit (relative error on 63,000 points
# of (0, 9]: Sanathanan-Koerner, then Lawson reweighting): 2.1e-8 relative in exact arithmetic. In float32,
# over every float32 u in (1e-30, 9.5]: at most 6.4 ulp from tanh (np.tanh's float32 loop: 1.4 ulp),
# never above 1 (the fit would pass 1 by 2 ulp from u = 8.18 on; tanh(8.15) is 3 ulp below 1); odd in u.
# tests/test_kernels.py checks the bound on a grid.
TANH_P = (0.9999999795, 0.1338105709, 0.003495625171, 2.060967972e-05, 1.335546701e-08)
TANH_Q = (1.0, 0.4671437271, 0.02587712393, 0.000328569487, 7.776892661e-07)
TANH_LIMIT = 8.15


@njit(inline="always")
def _tanh_float32(u):
    """tanh of a float32 u (see TANH_P), within [-1, 1]; NaN stays NaN."""
    f = np.float32
    s = u * u
    num = (((f(TANH_P[4]) * s + f(TANH_P[3])) * s + f(TANH_P[2])) * s + f(TANH_P[1])) * s + f(TANH_P[0])
    den = (((f(TANH_Q[4]) * s + f(TANH_Q[3])) * s + f(TANH_Q[2])) * s + f(TANH_Q[1])) * s + f(TANH_Q[0])
    t = u * num / den
    t = f(1) if u >= f(TANH_LIMIT) else t
    return f(-1) if u <= f(-TANH_LIMIT) else t


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def gelu_tanh_forward_float32(x, t, out, c, a):
    """t = tanh(u), u = c (x + a x^3), and out = 0.5 x (1 + t) in one pass; x, t, out flat float32."""
    half, one = np.float32(0.5), np.float32(1)
    for i in range(x.shape[0]):
        xi = x[i]
        ti = _tanh_float32(c * (xi + a * xi * xi * xi))
        t[i] = ti
        out[i] = half * xi * (one + ti)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def gelu_tanh_backward(x, t, dout, dx, c, a, half, one, three):
    for i in range(x.shape[0]):
        xi, ti = x[i], t[i]
        dx[i] = dout[i] * (half * (one + ti) + half * xi * (one - ti * ti) * c * (one + three * a * xi * xi))


@njit(inline="always")
def _normal_cdf(x, rsqrt2, half):
    """Phi(x); in the left tail erfc(-x/sqrt2)/2, which does not cancel as 1 + erf does."""
    z = x * rsqrt2
    return half * math.erfc(-z) if z < -1 else half * (1 + math.erf(z))


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def gelu_exact_forward(x, out, rsqrt2, half):
    for i in range(x.shape[0]):
        out[i] = x[i] * _normal_cdf(x[i], rsqrt2, half)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def gelu_exact_backward(x, dout, dx, rsqrt2, half, rsqrt2pi):
    for i in range(x.shape[0]):
        xi = x[i]
        dx[i] = dout[i] * (_normal_cdf(xi, rsqrt2, half) + xi * math.exp(-half * xi * xi) * rsqrt2pi)


@njit(inline="always")
def _sigmoid(g, one):
    """1 / (1 + exp(-g)) from exp(-|g|) only: no overflow."""
    e = math.exp(-abs(g))
    return one / (one + e) if g >= 0 else e / (one + e)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def swiglu_forward(gate, up, out, one):
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g * _sigmoid(g, one) * up[i]


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def swiglu_backward(gate, up, dout, dgate, dup, one):
    for i in range(gate.shape[0]):
        g = gate[i]
        sig = _sigmoid(g, one)
        dgate[i] = dout[i] * up[i] * sig * (one + g * (one - sig))
        dup[i] = dout[i] * g * sig


def _covered(*arrays):
    x = arrays[0]
    return (all(type(a) is np.ndarray and a.dtype == x.dtype and a.shape == x.shape for a in arrays)
            and x.dtype in (np.float32, np.float64))


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


SERVE_EXACT = False   # the erf form's kernel measured slower than its op (module docstring)


@contextlib.contextmanager
def exact_served():
    """Run the erf form's kernel too (its tests and the benchmark, which keep measuring it)."""
    global SERVE_EXACT
    saved, SERVE_EXACT = SERVE_EXACT, True
    try:
        yield
    finally:
        SERVE_EXACT = saved


class GELUNumba:
    """Kernel for GELU's tanh form, NumPy float32/float64 (the erf form runs the reference unless SERVE_EXACT)."""

    @staticmethod
    def forward(ctx, x, approximate="none"):
        ctx.reference = not (_covered(x) and (approximate == "tanh" or (approximate == "none" and SERVE_EXACT)))
        if ctx.reference:
            return GELU.forward(ctx, x, approximate=approximate)
        t = x.dtype.type
        xf = _flat(x)
        out = np.empty_like(xf)
        if approximate == "tanh":
            # t = tanh(u) is kept for backward as the reference keeps it
            ctx.tanh = np.empty_like(xf)
            if x.dtype == np.float32:
                gelu_tanh_forward_float32(xf, ctx.tanh, out, t(math.sqrt(2 / math.pi)), t(0.044715))
            else:  # tanh by NumPy's SIMD loop (Numba's tanh is scalar; _tanh_float32 is float32-accurate only)
                gelu_tanh_argument(xf, ctx.tanh, t(math.sqrt(2 / math.pi)), t(0.044715))
                np.tanh(ctx.tanh, out=ctx.tanh)
                gelu_tanh_forward(xf, ctx.tanh, out, t(0.5), t(1))
        else:
            gelu_exact_forward(xf, out, t(1 / math.sqrt(2)), t(0.5))
        ctx.xf, ctx.approximate, ctx.shape = xf, approximate, x.shape
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return GELU.backward(ctx, dout)
        xf, t = ctx.xf, ctx.xf.dtype.type
        dx = np.empty_like(xf)
        if ctx.approximate == "tanh":
            # dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)),  t = tanh(u)
            gelu_tanh_backward(xf, ctx.tanh, _flat(dout), dx, t(math.sqrt(2 / math.pi)), t(0.044715), t(0.5), t(1), t(3))
        else:
            # dx = dout * (Phi(x) + x phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
            gelu_exact_backward(xf, _flat(dout), dx, t(1 / math.sqrt(2)), t(0.5), t(1 / math.sqrt(2 * math.pi)))
        return dx.reshape(ctx.shape)


class SwiGLUNumba:
    """Kernel for SwiGLU when gate and up have the same shape (broadcasting falls back), float32/float64."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.reference = not _covered(gate, up)
        if ctx.reference:
            return SwiGLU.forward(ctx, gate, up)
        gf, uf = _flat(gate), _flat(up)
        out = np.empty_like(gf)
        swiglu_forward(gf, uf, out, gate.dtype.type(1))
        ctx.gf, ctx.uf, ctx.shape = gf, uf, gate.shape
        return out.reshape(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        if ctx.reference:
            return SwiGLU.backward(ctx, dout)
        dgate, dup = np.empty_like(ctx.gf), np.empty_like(ctx.uf)
        # dgate = dout * up * sig * (1 + gate (1 - sig)),  dup = dout * gate * sig
        swiglu_backward(ctx.gf, ctx.uf, _flat(dout), dgate, dup, ctx.gf.dtype.type(1))
        need = ctx.needs_input_grad
        return (dgate.reshape(ctx.shape) if need[0] else None), (dup.reshape(ctx.shape) if need[1] else None)


ADD_PARALLEL_MIN_VALUES = 1 << 20   # below this an add stays on one thread: the hand-off costs more


class AddThreads:
    """tensor.Add (the residual stream's adds, and the autograd's sums of two gradients meeting at a tensor)
    with both operands float arrays of one shape and dtype, C-contiguous, of at least ADD_PARALLEL_MIN_VALUES
    values: np.add over threads.THREADS contiguous parts at once (each part's np.add lets go of the GIL).
    The same additions, so the same bits. Anything else (broadcasting, small arrays): the op's x + y."""

    @staticmethod
    def forward(ctx, x, y):
        if not (type(x) is np.ndarray and type(y) is np.ndarray and x.shape == y.shape and x.dtype == y.dtype
                and x.dtype.kind == "f" and x.size >= ADD_PARALLEL_MIN_VALUES and threads.THREADS > 1
                and x.flags.c_contiguous and y.flags.c_contiguous):
            return Add.forward(ctx, x, y)
        ctx.shapes = x.shape, y.shape
        out, xf, yf = np.empty_like(x), x.reshape(-1), y.reshape(-1)
        of, cuts = out.reshape(-1), [x.size * i // threads.THREADS for i in range(threads.THREADS + 1)]
        threads.run_items(lambda a, b: np.add(xf[a:b], yf[a:b], out=of[a:b]), list(zip(cuts, cuts[1:])), True,
                          blas=False)
        return out

    backward = staticmethod(Add.backward)
