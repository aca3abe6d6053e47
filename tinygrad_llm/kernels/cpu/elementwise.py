"""GELU (tanh form and exact erf form) and SwiGLU, forward and backward, in one to three passes
(references: functional.GELU, functional.SwiGLU).

The references evaluate a NumPy expression per operation (the tanh form's forward alone is seven
passes, the exact form's erf a Horner series over masked copies) and save a second array (tanh(u),
Phi(x) or sigmoid(gate)) for backward. Here the exact form and SwiGLU save only their inputs and
backward recomputes the transcendental in the same pass that forms the gradient: less memory, fewer
passes. Constants are
passed in the input's dtype, so float32 work stays float32 (tanhf, erff, expf), as in NumPy.

Numba calls the scalar libm tanhf/expf per element while NumPy's np.tanh/np.exp are SIMD loops: a
tanh computed in the Numba loop made the tanh form 0.5x the reference. So the tanh form in float64
runs three passes: Numba forms u, np.tanh(u) in place (SIMD), Numba forms the output. In float32 one
Numba pass forms u, t = tanh(u) by a rational function (_tanh_float32: arithmetic only, so LLVM
vectorises the loop) and the output: (768,512) 0.236 -> 0.183 ms, (16384,1536) 25.1 -> 14.3 ms (2
cores; np.tanh alone took 0.14 and 10.6 ms; the rational tanh is within 6.4 ulp where np.tanh is within
1.4, and for x below about -3, where 1 + t cancels, GELU's float32 output carries a few times the
reference's relative error, a tiny absolute one). Either way t = tanh(u) is kept for backward (as the
reference keeps it), whose single Numba pass needs no transcendental. SwiGLU's exp is cheap next to its
five NumPy passes.

The exact (erf) form's kernel, libm's erf per element, is measured but not served (SERVE_EXACT = False):
it lost to the reference's vectorised erf series, 15.7 vs 11.3 ms forward + backward at (12,64,512) and
997 vs 903 ms at (64,256,1536) float32 (benchmarks/kernels.py gelu, 2 cores); both are far behind torch's
(0.37 and 32 ms). The model's default is the tanh form (GPT-2's), which the kernel serves.
"""
import contextlib
import math

import numpy as np
from numba import njit

from ...functional import GELU, SwiGLU
from .threads import TOLERANCE, compare_with_reference, forward_backward, median_ms, table_row, torch_or_none


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


SERVE_EXACT = False   # the erf form's kernel measured slower than its reference (module docstring)


@contextlib.contextmanager
def exact_served():
    """Run the erf form's kernel too (validation and the benchmark, which keep measuring it)."""
    global SERVE_EXACT
    saved, SERVE_EXACT = SERVE_EXACT, True
    try:
        yield
    finally:
        SERVE_EXACT = saved


class NumbaGELU:
    """Kernel for GELU's tanh form, NumPy float32/float64 (the erf form runs the reference unless SERVE_EXACT)."""

    @staticmethod
    def forward(ctx, x, approximate="none"):
        ctx.fallback = not (_covered(x) and (approximate == "tanh" or (approximate == "none" and SERVE_EXACT)))
        if ctx.fallback:
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
        if ctx.fallback:
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


class NumbaSwiGLU:
    """Kernel for SwiGLU when gate and up have the same shape (broadcasting falls back), float32/float64."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.fallback = not _covered(gate, up)
        if ctx.fallback:
            return SwiGLU.forward(ctx, gate, up)
        gf, uf = _flat(gate), _flat(up)
        out = np.empty_like(gf)
        swiglu_forward(gf, uf, out, gate.dtype.type(1))
        ctx.gf, ctx.uf, ctx.shape = gf, uf, gate.shape
        return out.reshape(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        if ctx.fallback:
            return SwiGLU.backward(ctx, dout)
        dgate, dup = np.empty_like(ctx.gf), np.empty_like(ctx.uf)
        # dgate = dout * up * sig * (1 + gate (1 - sig)),  dup = dout * gate * sig
        swiglu_backward(ctx.gf, ctx.uf, _flat(dout), dgate, dup, ctx.gf.dtype.type(1))
        need = ctx.needs_input_grad
        return (dgate.reshape(ctx.shape) if need[0] else None), (dup.reshape(ctx.shape) if need[1] else None)


def _inputs(shape, dtype, seed=0, strided=False):
    rng = np.random.default_rng(seed)
    draw = lambda: (rng.standard_normal(shape[:-1] + (2 * shape[-1],))[..., ::2] if strided else rng.standard_normal(shape)) * 3
    return draw().astype(dtype), draw().astype(dtype)


VALIDATION_SHAPES = [(3, 7, 11), (1,), (129,), (2, 64)]


@exact_served()
def validate():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape in VALIDATION_SHAPES:
            for strided in (False, True):
                x, y = _inputs(shape, dtype, strided=strided)
                x.reshape(-1)[:1] = -9.0  # far left tail: Phi(x) ~ 1e-19
                cases = [(GELU, NumbaGELU, (x,), dict(approximate="tanh")), (GELU, NumbaGELU, (x,), dict(approximate="none")),
                         (SwiGLU, NumbaSwiGLU, (x, y), {}), (SwiGLU, NumbaSwiGLU, (x, y[..., :1]), {})]  # broadcast: fallback
                for reference, kernel, arrays, attrs in cases:
                    err = compare_with_reference(reference, kernel, arrays, attrs)
                    assert err <= TOLERANCE[np.dtype(dtype)], f"{kernel.__name__} {shape} {attrs} {np.dtype(dtype).name}: {err}"
                    worst = max(worst, err)
    return worst


@exact_served()
def benchmark(shapes=((12, 64, 512), (64, 256, 1536))):
    """Forward + backward, float32, the MLP hidden activations (B,T,4C) of the two model configs."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        x, y = _inputs(shape, np.float32)
        cases = [("gelu tanh", GELU, NumbaGELU, (x,), dict(approximate="tanh")),
                 ("gelu exact", GELU, NumbaGELU, (x,), dict(approximate="none")),
                 ("swiglu", SwiGLU, NumbaSwiGLU, (x, y), {})]
        for name, reference, kernel, arrays, attrs in cases:
            t_numba = median_ms(forward_backward(kernel, arrays, attrs), repeat=5)
            t_numpy = median_ms(forward_backward(reference, arrays, attrs), repeat=5)
            t_torch = None
            if torch is not None:
                tx, ty = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y).requires_grad_()
                F = torch.nn.functional
                fn = {"gelu tanh": lambda: F.gelu(tx, approximate="tanh"), "gelu exact": lambda: F.gelu(tx),
                      "swiglu": lambda: F.silu(tx) * ty}[name]
                t_torch = median_ms(lambda: fn().backward(torch.ones(shape)), repeat=5)
            rows.append(table_row(f"{name} fwd+bwd", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows
