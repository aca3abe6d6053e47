"""The op library: the layers of a GPT, each a fused Function with a handwritten backward.

Names and semantics mirror torch.nn.functional, so a reader can put the two side by side; the
differences are stated where they occur (linear's w is (in, out); cross_entropy's class axis is last;
rows with nothing to attend to or nothing to average give zeros, not NaN).

Each op reads as one screen: the shape contract on the docstring's first line, the forward written
against the inputs' array module `xp` (numpy or cupy), the saved context, one comment line stating
the derivative in the code's symbols, the backward, and a link to its derivation in docs/backward/.
The public function below each class checks its inputs and calls `.apply`. Every op computes in its
input dtype. Composite twins built only from Tensor primitives live in composite.py (for the tests).
"""
import math

import numpy as np

from . import backend
from .backend import add_at, array_module, sum_rows
from .tensor import Add, Context, Function, Tensor, matmul, unbroadcast


def _data(x, like=None):
    """The array behind an index argument (ids, targets, positions, masks): a Tensor, array or list.

    With `like` (a Tensor on the GPU), a host array or list is copied to the GPU beside it."""
    if isinstance(x, Tensor):
        x = x.data
    elif not (hasattr(x, "dtype") and hasattr(x, "shape")):
        x = np.asarray(x)
    if like is not None and array_module(like.data) is not np and array_module(x) is np:
        x = array_module(like.data).asarray(x)
    return x


def _require_float(op, name, x):
    if x is not None and np.dtype(x.dtype).kind != "f":
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")


def _require_int(op, name, x):
    if np.dtype(x.dtype).kind not in "iu":
        raise TypeError(f"{op}: {name} must hold integers, got dtype {x.dtype}")


def _as_index_array(op, name, x):
    """An index argument handed to a Function's apply: it must be an integer array (not a list)."""
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        raise TypeError(f"{op}: {name} must be an integer array, got {type(x).__name__}")
    _require_int(op, name, x)


def _first_outside(x, high, ignore=None):
    """The first value of the integer array x outside [0, high) (and not `ignore`), or None.

    Cheap on the common path: a min and a max; the offending value is looked for only when they fail."""
    if x.size == 0:
        return None
    if int(x.min()) >= 0 and int(x.max()) < high:
        return None
    bad = (x < 0) | (x >= high)
    if ignore is not None:
        bad &= x != ignore
    values = x[bad]
    return int(values.reshape(-1)[0]) if values.size else None


def _sum_to_last(a):
    """(..., C) -> (C,): the sum over every leading axis (a parameter's gradient)."""
    return sum_rows(a.reshape(-1, a.shape[-1]))


# ---- linear --------------------------------------------------------------------------------------

class Linear(Function):
    """(..., IN), (IN, OUT), (OUT,) -> (..., OUT): out = x w + b, with w stored (in, out) as in GPT-2."""
    kernels = {"cuda": "linear.LinearCuda"}
    bf16_kernels = {"cpu": "mixed.LinearBF16Mkl", "cuda": "mixed.LinearBF16Cuda"}   # under precision.autocast("bfloat16")

    @staticmethod
    def forward(ctx, x, w, b=None):
        ctx.x, ctx.w, ctx.has_b = x, w, b is not None
        out = matmul(x, w)  # one 2-D GEMM over every leading axis (tensor.matmul says why)
        if b is not None and b.dtype == out.dtype:
            out += b        # out is the product's own fresh array: no second (..., OUT) array
        elif b is not None:
            out = out + b
        return out

    # derivation: docs/backward/linear.md
    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.x, ctx.w
        dout2 = dout.reshape(-1, dout.shape[-1])
        need = ctx.needs_input_grad
        # dx = dout w^T, dw = x^T dout (summed over every leading axis), db = sum(dout)
        dx = (dout2 @ w.T).reshape(x.shape) if need[0] else None
        dw = (x.reshape(-1, x.shape[-1]).T @ dout2) if need[1] else None
        db = sum_rows(dout2) if ctx.has_b and need[2] else None
        return dx, dw, db


def linear(x, w, b=None):
    """(..., IN), (IN, OUT), (OUT,) -> (..., OUT). Unlike torch's (out, in), w is (in, out): out = x w + b."""
    for name, t in (("x", x), ("w", w), ("b", b)):
        _require_float("linear", name, t)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has shape {tuple(x.shape)} but w has shape {tuple(w.shape)}; expected x (..., IN) and w (IN, OUT)")
    if b is not None and tuple(b.shape) != (w.shape[1],):
        raise ValueError(f"linear: b has shape {tuple(b.shape)} but w has shape {tuple(w.shape)}; expected b ({w.shape[1]},)")
    return Linear.apply(x, w, b)


# ---- embedding -----------------------------------------------------------------------------------

class Embedding(Function):
    """(B,T) int, (V,C) -> (B,T,C): row idx[b,t] of the table w (any index shape)."""
    kernels = {"cpu": "embedding.EmbeddingNumba"}

    @staticmethod
    def check_inputs(idx, w):
        _as_index_array("embedding", "idx", idx)
        if getattr(w, "ndim", None) != 2:
            raise ValueError(f"embedding: w must be a (V, C) table, got shape {tuple(getattr(w, 'shape', ()))}")
        bad = _first_outside(idx, w.shape[0])
        if bad is not None:
            raise IndexError(f"embedding: token id {bad} is outside the vocabulary [0, {w.shape[0]}) of w {tuple(w.shape)}")

    @staticmethod
    def forward(ctx, idx, w):
        ctx.idx, ctx.w_shape, ctx.dtype = idx, w.shape, w.dtype
        return w[idx]

    # derivation: docs/backward/embedding.md
    @staticmethod
    def backward(ctx, dout):
        xp = array_module(dout)
        dw = xp.zeros(ctx.w_shape, dtype=ctx.dtype)
        # dw[v] = sum of dout[b,t] over every (b,t) with idx[b,t] == v (repeated ids accumulate)
        add_at(xp, dw, ctx.idx.reshape(-1), dout.reshape(-1, ctx.w_shape[1]))
        return None, dw


def embedding(idx, w):
    """(B,T) int, (V,C) -> (B,T,C). Ids outside [0, V) raise IndexError (Embedding.check_inputs)."""
    idx = _data(idx, like=w)
    _require_float("embedding", "w", w)
    return Embedding.apply(idx, w)


# ---- normalisation -------------------------------------------------------------------------------

def _check_norm_shapes(op, x, params):
    if getattr(x, "ndim", 0) < 1:
        raise ValueError(f"{op}: x must have at least one axis, got shape {tuple(getattr(x, 'shape', ()))}")
    for name, p in params:
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"{op}: x has last axis {x.shape[-1]} but {name} has shape {tuple(p.shape)}; expected ({x.shape[-1]},)")


class LayerNorm(Function):
    """(B,T,C), (C,), (C,) -> (B,T,C): normalise over the last axis, then scale by w and shift by b."""
    kernels = {"cpu": "layer_norm.LayerNormNumba", "cuda": "layer_norm.LayerNormCuda"}
    bf16_kernels = {"cpu": "mixed_elementwise.LayerNormBF16Numba",   # float32, plus a bf16 copy
                    "cuda": "mixed_elementwise.LayerNormBF16Cuda"}   # (precision.BF16_COPY_PRODUCERS)

    @staticmethod
    def check_inputs(x, w=None, b=None, eps=1e-5):
        _check_norm_shapes("layer_norm", x, (("w", w), ("b", b)))

    @staticmethod
    def forward(ctx, x, w=None, b=None, eps=1e-5):
        xp = array_module(x)
        mean = x.mean(axis=-1, keepdims=True)
        xc = x - mean
        rstd = 1 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
        xhat = xc * rstd
        ctx.x, ctx.w, ctx.mean, ctx.rstd, ctx.has_b = x, w, mean, rstd, b is not None
        out = xhat * w if w is not None else xhat
        return out + b if b is not None else out

    # derivation: docs/backward/layer_norm.md
    @staticmethod
    def backward(ctx, dout):
        xhat = (ctx.x - ctx.mean) * ctx.rstd
        dxhat = dout * ctx.w if ctx.w is not None else dout
        need = ctx.needs_input_grad
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dw = sum(dout * xhat),  db = sum(dout)
        dx = None
        if need[0]:
            dx = ctx.rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        dw = _sum_to_last(dout * xhat) if need[1] else None
        db = _sum_to_last(dout) if need[2] else None
        return dx, dw, db


def _check_norm_params(op, x, params):
    _require_float(op, "x", x)
    for name, p in params:
        _require_float(op, name, p)


def layer_norm(x, w=None, b=None, eps=1e-5):
    """(B,T,C), (C,), (C,) -> (B,T,C). Over the last axis only; w and b may be None."""
    _check_norm_params("layer_norm", x, (("w", w), ("b", b)))
    return LayerNorm.apply(x, w, b, eps=float(eps))


class RMSNorm(Function):
    """(B,T,C), (C,) -> (B,T,C): x / sqrt(mean(x^2) + eps) over the last axis, scaled by w."""
    kernels = {"cpu": "layer_norm.RMSNormNumba"}

    @staticmethod
    def check_inputs(x, w=None, eps=None):
        _check_norm_shapes("rms_norm", x, (("w", w),))

    @staticmethod
    def forward(ctx, x, w=None, eps=None):
        xp = array_module(x)
        rstd = 1 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        ctx.x, ctx.w, ctx.rstd = x, w, rstd
        xhat = x * rstd
        return xhat * w if w is not None else xhat

    # derivation: docs/backward/rms_norm.md
    @staticmethod
    def backward(ctx, dout):
        xhat = ctx.x * ctx.rstd
        dxhat = dout * ctx.w if ctx.w is not None else dout
        need = ctx.needs_input_grad
        # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)),  dw = sum(dout * xhat)
        dx = ctx.rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) if need[0] else None
        dw = _sum_to_last(dout * xhat) if need[1] else None
        return dx, dw


def rms_norm(x, w=None, eps=None):
    """(B,T,C), (C,) -> (B,T,C). eps=None means np.finfo(x.dtype).eps, as torch.nn.functional.rms_norm."""
    _check_norm_params("rms_norm", x, (("w", w),))
    eps = float(np.finfo(x.dtype).eps) if eps is None else float(eps)
    return RMSNorm.apply(x, w, eps=eps)


# ---- activations ---------------------------------------------------------------------------------

def _exp_neg_square(x):
    """exp(-x^2) without the rounding of x*x amplified by exp: x = hi + lo with hi^2 (nearly) exact."""
    xp = array_module(x)
    hi = xp.round(x * 4096) / 4096
    return xp.exp(-hi * hi) * xp.exp(-(x - hi) * (x + hi))


# erf(x) = 2/sqrt(pi) exp(-x^2) x sum_n c_n (2x^2)^n with c_n = 1 / (1*3*5*...*(2n+1)): every term positive.
_ERF_SERIES = [1.0]
for _n in range(1, 40):
    _ERF_SERIES.append(_ERF_SERIES[-1] / (2 * _n + 1))
_ERF_TERMS = {np.dtype(np.float64): 38, np.dtype(np.float32): 26, np.dtype(np.float16): 14}  # enough at |x| = 2.5


def _erf_small(x):
    """erf(x) for |x| < 2.5 from the positive series above (Horner in y = 2x^2)."""
    y = 2 * x * x
    terms = _ERF_SERIES[:_ERF_TERMS.get(np.dtype(x.dtype), 38)]
    acc = array_module(x).full_like(x, terms[-1])
    for c in reversed(terms[:-1]):
        acc *= y
        acc += c
    return (2 / math.sqrt(math.pi)) * _exp_neg_square(x) * x * acc


def _erfc_large(x):
    """erfc(x) for x >= 2.5: exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), 40 levels."""
    x = array_module(x).minimum(x, 40.0)  # erfc(40) underflows to 0 anyway; keeps inf out of the fraction
    t = x.copy()
    for n in range(40, 0, -1):
        t = x + (n / 2) / t
    return _exp_neg_square(x) / (math.sqrt(math.pi) * t)


def _erf(x):
    """erf(x) to ~1e-15 relative error in float64 (numpy has none): the series below 2.5, 1 - erfc above."""
    xp = array_module(x)
    out = xp.empty_like(x)
    small = xp.abs(x) < 2.5
    out[small] = _erf_small(x[small])
    large = ~small  # also NaN, which stays NaN
    out[large] = xp.sign(x[large]) * (1 - _erfc_large(xp.abs(x[large])))
    return out


def _normal_cdf(x):
    """Phi(x) = (1 + erf(x/sqrt2)) / 2; in the far left tail erfc(-x/sqrt2) / 2, which does not cancel."""
    xp = array_module(x)
    z = x / x.dtype.type(math.sqrt(2))
    out = xp.empty_like(x)
    tail = z <= -2.5
    out[tail] = 0.5 * _erfc_large(-z[tail])
    out[~tail] = 0.5 * (1 + _erf(z[~tail]))
    return out


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


class GELU(Function):
    """(...) -> (...): x Phi(x) ("none", exact, via erf) or its tanh approximation ("tanh")."""
    kernels = {"cpu": "elementwise.GELUNumba", "cuda": "elementwise.GELUCuda"}
    bf16_kernels = {"cpu": "mixed_elementwise.GELUBF16Numba",   # float32, plus bf16 copies
                    "cuda": "mixed_elementwise.GELUBF16Cuda"}   # (precision.BF16_COPY_PRODUCERS)

    @staticmethod
    def forward(ctx, x, approximate="none"):
        xp = array_module(x)
        ctx.x, ctx.approximate = x, approximate
        if approximate == "tanh":
            ctx.t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            return 0.5 * x * (1 + ctx.t)
        ctx.cdf = _normal_cdf(x)
        return x * ctx.cdf

    # derivation: docs/backward/gelu.md
    @staticmethod
    def backward(ctx, dout):
        xp = array_module(dout)
        x = ctx.x
        if ctx.approximate == "tanh":
            # dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)),  t = tanh(u)
            t = ctx.t
            return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x))
        # dx = dout * (Phi(x) + x phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
        return dout * (ctx.cdf + x * xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def gelu(x, approximate="none"):
    """(...) -> (...). approximate="none" is the exact erf form (torch's default), "tanh" GPT-2's form."""
    _require_float("gelu", "x", x)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(x, approximate=approximate)


def _sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp of -|x| only."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class SiLU(Function):
    """(...) -> (...): x sigmoid(x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.x, ctx.sig = x, _sigmoid(x)
        return x * ctx.sig

    # derivation: docs/backward/silu_and_swiglu.md
    @staticmethod
    def backward(ctx, dout):
        sig = ctx.sig
        # dx = dout * sig * (1 + x (1 - sig))
        return dout * sig * (1 + ctx.x * (1 - sig))


def silu(x):
    """(...) -> (...): x * sigmoid(x)."""
    _require_float("silu", "x", x)
    return SiLU.apply(x)


class SwiGLU(Function):
    """(B,T,H), (B,T,H) -> (B,T,H): silu(gate) * up (broadcasting allowed)."""
    kernels = {"cpu": "elementwise.SwiGLUNumba"}

    @staticmethod
    def forward(ctx, gate, up):
        sig = _sigmoid(gate)
        ctx.gate, ctx.up, ctx.sig = gate, up, sig
        return gate * sig * up

    # derivation: docs/backward/silu_and_swiglu.md
    @staticmethod
    def backward(ctx, dout):
        gate, up, sig = ctx.gate, ctx.up, ctx.sig
        need = ctx.needs_input_grad
        # dgate = dout * up * sig * (1 + gate (1 - sig)),  dup = dout * gate * sig
        dgate = unbroadcast(dout * up * sig * (1 + gate * (1 - sig)), gate.shape) if need[0] else None
        dup = unbroadcast(dout * gate * sig, up.shape) if need[1] else None
        return dgate, dup


def swiglu(gate, up):
    """(B,T,H), (B,T,H) -> (B,T,H): silu(gate) * up, the gated unit of Llama's MLP."""
    _require_float("swiglu", "gate", gate)
    _require_float("swiglu", "up", up)
    try:
        np.broadcast_shapes(tuple(gate.shape), tuple(up.shape))
    except ValueError:
        raise ValueError(f"swiglu: gate has shape {tuple(gate.shape)} and up has shape {tuple(up.shape)}; they must broadcast") from None
    return SwiGLU.apply(gate, up)


# ---- softmax -------------------------------------------------------------------------------------

class Softmax(Function):
    """(..., N, ...) -> same: exp(x) / sum(exp(x)) along `axis`, computed from x - max(x)."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = array_module(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        ctx.p, ctx.axis = e / e.sum(axis=axis, keepdims=True), axis
        return ctx.p

    # derivation: docs/backward/softmax_and_log_softmax.md
    @staticmethod
    def backward(ctx, dout):
        p = ctx.p
        # dx = p * (dout - sum(dout * p))
        return p * (dout - (dout * p).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    """(..., N, ...) -> same: x - logsumexp(x) along `axis`, computed from x - max(x)."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = array_module(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        ctx.out, ctx.axis = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True)), axis
        return ctx.out

    # derivation: docs/backward/softmax_and_log_softmax.md
    @staticmethod
    def backward(ctx, dout):
        xp = array_module(dout)
        # dx = dout - softmax(x) * sum(dout),  softmax(x) = exp(out)
        return dout - xp.exp(ctx.out) * dout.sum(axis=ctx.axis, keepdims=True)


def _check_axis(op, x, axis):
    if not -x.ndim <= axis < max(x.ndim, 1):
        raise ValueError(f"{op}: axis {axis} is out of range for shape {tuple(x.shape)}")


def softmax(x, axis=-1):
    """(...) -> (...): probabilities along `axis`; stable for logits of any size."""
    _require_float("softmax", "x", x)
    _check_axis("softmax", x, axis)
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    """(...) -> (...): log-probabilities along `axis`; stable for logits of any size."""
    _require_float("log_softmax", "x", x)
    _check_axis("log_softmax", x, axis)
    return LogSoftmax.apply(x, axis=axis)


# ---- cross-entropy -------------------------------------------------------------------------------

class CrossEntropy(Function):
    """(..., V), (...) int -> () for "mean"/"sum", (...) for "none": -log softmax(logits)[target]."""
    kernels = {"cpu": "cross_entropy.CrossEntropyNumba", "cuda": "cross_entropy.CrossEntropyCuda"}

    @staticmethod
    def check_inputs(logits, targets, ignore_index=-100, reduction="mean"):
        _as_index_array("cross_entropy", "targets", targets)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        shape = tuple(getattr(logits, "shape", ()))
        if len(shape) < 1 or tuple(targets.shape) != shape[:-1]:
            raise ValueError(f"cross_entropy: logits have shape {shape} and targets have shape {tuple(targets.shape)}; "
                             f"expected targets of shape {shape[:-1]} (class axis last)")
        if shape[-1] == 0:
            raise ValueError(f"cross_entropy: logits have shape {shape}: no classes")
        bad = _first_outside(targets, shape[-1], ignore=ignore_index)
        if bad is not None:
            raise IndexError(f"cross_entropy: target {bad} is outside [0, {shape[-1]}) and is not ignore_index ({ignore_index})")

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100, reduction="mean"):
        xp = array_module(logits)
        V = logits.shape[-1]
        x, t = logits.reshape(-1, V), targets.reshape(-1)
        valid = t != ignore_index
        rows, safe_t = xp.arange(t.shape[0]), xp.where(valid, t, 0)
        shifted = x - x.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        sum_e = e.sum(axis=1)
        nll = xp.where(valid, xp.log(sum_e) - shifted[rows, safe_t], 0).astype(logits.dtype)
        count = int(valid.sum())
        # "mean" divides by the number of counted targets; with none counted the loss is 0, not 0/0
        ctx.scale = 1 / max(count, 1) if reduction == "mean" else 1.0
        ctx.p, ctx.safe_t, ctx.valid = e / sum_e[:, None], safe_t, valid
        ctx.reduction, ctx.shape = reduction, logits.shape
        if reduction == "none":
            return nll.reshape(targets.shape)
        return xp.asarray(nll.sum() * ctx.scale, dtype=logits.dtype)

    # derivation: docs/backward/cross_entropy.md
    @staticmethod
    def backward(ctx, dout):
        xp = array_module(dout)
        # dlogits = (softmax(logits) - onehot(target)) * dout * scale, zero on ignored rows
        dx = ctx.p.copy()
        dx[xp.arange(dx.shape[0]), ctx.safe_t] -= 1
        row_scale = ctx.valid * (dout.reshape(-1) if ctx.reduction == "none" else dout) * ctx.scale
        dx *= row_scale.astype(dx.dtype)[:, None]
        return dx.reshape(ctx.shape), None


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """(..., V), (...) int -> loss. Class axis LAST (torch puts it at axis 1 beyond 2-D).

    reduction "mean" averages over targets != ignore_index (0.0 with zero gradient when all are
    ignored; torch gives NaN), "sum" adds them, "none" returns the targets' shape with 0 at ignored ones.
    """
    targets = _data(targets, like=logits)
    _require_float("cross_entropy", "logits", logits)
    # targets' dtype, shape and range: CrossEntropy.check_inputs, which apply runs
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index, reduction=reduction)


# ---- dropout -------------------------------------------------------------------------------------

class Dropout(Function):
    """(...) -> (...): zero each element with probability p, scale the rest by 1/(1-p)."""
    kernels = {"cuda": "elementwise.DropoutCuda"}

    @staticmethod
    def forward(ctx, x, p=0.5, rng=None):
        xp = array_module(x)
        if p == 1:
            ctx.mask = xp.zeros_like(x)
        else:  # the mask is drawn once, here, from the caller's generator, and reused by backward
            keep = xp.asarray(rng.random(x.shape, dtype=np.float32) >= p)
            ctx.mask = keep.astype(x.dtype) * x.dtype.type(1 / (1 - p))
        return x * ctx.mask

    # derivation: docs/backward/dropout_and_dropout_add.md
    @staticmethod
    def backward(ctx, dout):
        # dx = dout * mask  (mask = keep / (1 - p))
        return dout * ctx.mask


def dropout(x, p=0.5, training=True, rng=None):
    """(...) -> (...). Inverted dropout; training=False or p=0 returns x itself. rng: np.random.Generator."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0:
        return x
    _require_float("dropout", "x", x)
    if p < 1 and not isinstance(rng, np.random.Generator):
        raise ValueError("dropout: training with p > 0 needs rng, an np.random.Generator (e.g. np.random.default_rng(seed))")
    return Dropout.apply(x, p=float(p), rng=rng)


class DropoutAdd(Function):
    """(...), (...) -> (...): x + dropout(y), the residual add and the branch's dropout in one op.

    x (the residual stream) and y (the branch) have one shape and dtype. The mask is Dropout's for the
    same generator state (one rng.random draw of y's shape), so dropout_add(x, y) == x + dropout(y) bit
    for bit, values and gradients."""
    kernels = {"cuda": "elementwise.DropoutAddCuda"}
    bf16_kernels = {"cuda": "mixed_elementwise.DropoutAddBF16Cuda"}   # float32, plus dy's bf16 copy and column sums

    @staticmethod
    def forward(ctx, x, y, p=0.5, rng=None):
        xp = array_module(y)
        if p == 1:
            ctx.mask = xp.zeros_like(y)
        else:  # Dropout.forward's draw, from the caller's generator, reused by backward
            keep = xp.asarray(rng.random(y.shape, dtype=np.float32) >= p)
            ctx.mask = keep.astype(y.dtype) * y.dtype.type(1 / (1 - p))
        dropped = y * ctx.mask
        # the sum by Add's kernel for the device (threads on the CPU): the unfused x + dropout(y)'s additions
        return backend.accelerated(Add, x, dropped).forward(Context((False, False)), x, dropped)

    # derivation: docs/backward/dropout_and_dropout_add.md
    @staticmethod
    def backward(ctx, dout):
        # out = x + y * mask: dx = dout, dy = dout * mask
        need = ctx.needs_input_grad
        return dout if need[0] else None, dout * ctx.mask if need[1] else None


def dropout_add(x, y, p=0.5, training=True, rng=None):
    """(...), (...) -> (...): x + dropout(y, p) for x and y of one shape and dtype (a residual add of a
    dropped-out branch). training=False or p=0 returns x + y (the plain Add). rng: np.random.Generator."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout_add: p must be in [0, 1], got {p}")
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"dropout_add: x has shape {tuple(x.shape)}, y has shape {tuple(y.shape)}; expected one shape")
    if np.dtype(x.dtype) != np.dtype(y.dtype):
        raise ValueError(f"dropout_add: x has dtype {x.dtype}, y has dtype {y.dtype}; expected one dtype")
    if not training or p == 0:
        return Add.apply(x, y)
    _require_float("dropout_add", "y", y)
    if p < 1 and not isinstance(rng, np.random.Generator):
        raise ValueError("dropout_add: training with p > 0 needs rng, an np.random.Generator "
                         "(e.g. np.random.default_rng(seed))")
    return DropoutAdd.apply(x, y, p=float(p), rng=rng)


# ---- attention -----------------------------------------------------------------------------------

def _check_attention_shapes(q, k, v, mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if getattr(t, "ndim", 0) < 2:
            raise ValueError(f"scaled_dot_product_attention: {name} has shape {tuple(getattr(t, 'shape', ()))}; "
                             "expected (B, NH, T, HS)")
    qs, ks, vs = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    if qs[:-2] != ks[:-2] or ks[:-1] != vs[:-1] or qs[-1] != ks[-1]:
        raise ValueError(f"scaled_dot_product_attention: q has shape {qs}, k has shape {ks}, v has shape {vs}; "
                         "expected (B, NH, TQ, HS), (B, NH, TK, HS), (B, NH, TK, HS)")
    if mask is not None:
        if getattr(mask, "dtype", None) != np.bool_:
            raise TypeError(f"scaled_dot_product_attention: mask must be boolean (True = may attend), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        try:
            np.broadcast_shapes(tuple(mask.shape), qs[:-1] + (ks[-2],))
        except ValueError:
            raise ValueError(f"scaled_dot_product_attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"{qs[:-1] + (ks[-2],)} (B, NH, TQ, TK)") from None


class ScaledDotProductAttention(Function):
    """(B,NH,TQ,HS), (B,NH,TK,HS), (B,NH,TK,HS), mask (B,NH,TQ,TK) bool or None -> (B,NH,TQ,HS)."""
    kernels = {"cpu": "attention.ScaledDotProductAttentionNumba",
               "cuda": "attention.ScaledDotProductAttentionCuda"}

    @staticmethod
    def check_inputs(q, k, v, mask=None, **attrs):
        _check_attention_shapes(q, k, v, mask)

    @staticmethod
    def forward(ctx, q, k, v, mask=None, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        xp = array_module(q)
        TQ, TK = q.shape[-2], k.shape[-2]
        allowed = mask
        if causal:  # query i sits at absolute position TK - TQ + i and sees keys 0 .. TK - TQ + i
            below = xp.arange(TK)[None, :] <= xp.arange(TQ)[:, None] + (TK - TQ)
            allowed = below if allowed is None else allowed & below
        s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)
        if allowed is not None:
            s = xp.where(allowed, s, -xp.inf)
        m = s.max(axis=-1, keepdims=True)
        e = xp.exp(s - xp.where(xp.isfinite(m), m, 0))  # a row with no allowed key is all exp(-inf) = 0
        denom = e.sum(axis=-1, keepdims=True)
        p = e / xp.where(denom == 0, 1, denom)
        ctx.drop = None
        if dropout_p > 0:  # dropout on the probabilities: the mask is drawn once, here, and reused by backward
            keep = xp.asarray(rng.random(p.shape, dtype=np.float32) >= dropout_p)
            ctx.drop = keep.astype(p.dtype) * p.dtype.type(0 if dropout_p == 1 else 1 / (1 - dropout_p))
        ctx.q, ctx.k, ctx.v, ctx.p, ctx.scale = q, k, v, p, scale
        return (p if ctx.drop is None else p * ctx.drop) @ v

    # derivation: docs/backward/scaled_dot_product_attention.md
    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, drop = ctx.q, ctx.k, ctx.v, ctx.p, ctx.drop
        scale = q.dtype.type(ctx.scale)
        need = ctx.needs_input_grad
        # Pd = P * M (M = keep/(1-p), or 1): dv = Pd^T dO, dP = (dO V^T) * M, dS = P * (dP - rowsum(dP * P)),
        # dq = scale dS K, dk = scale dS^T Q
        dv = (p if drop is None else p * drop).swapaxes(-1, -2) @ dout if need[2] else None
        dp = dout @ v.swapaxes(-1, -2)
        if drop is not None:
            dp = dp * drop
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        dq = (ds @ k) * scale if need[0] else None
        dk = (ds.swapaxes(-1, -2) @ q) * scale if need[1] else None
        return dq, dk, dv, None


def scaled_dot_product_attention(q, k, v, causal=True, mask=None, scale=None, dropout_p=0.0, rng=None):
    """(B,NH,TQ,HS), (B,NH,TK,HS), (B,NH,TK,HS) -> (B,NH,TQ,HS). dropout(softmax(q k^T * scale)) v.

    mask: boolean, broadcastable to (B,NH,TQ,TK), True = may attend (torch's boolean attn_mask).
    causal: query i may attend keys up to TK - TQ + i (the query block is aligned to the END of the
    keys, as a KV cache needs; torch's is_causal when TQ == TK). A query with no allowed key outputs
    zeros and gets zero gradient (torch gives NaN). scale defaults to 1/sqrt(HS).
    dropout_p: inverted dropout on the attention probabilities, as torch's (training only: pass 0 in
    eval); its mask is drawn from rng (an np.random.Generator, required when dropout_p > 0).
    """
    if not 0 <= dropout_p <= 1:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0 and not isinstance(rng, np.random.Generator):
        raise ValueError("scaled_dot_product_attention: dropout_p > 0 needs rng, an np.random.Generator "
                         "(e.g. np.random.default_rng(seed))")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_float("scaled_dot_product_attention", name, t)
    if mask is not None:
        mask = _data(mask, like=q)
    # shapes and mask: ScaledDotProductAttention.check_inputs, which apply runs
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return ScaledDotProductAttention.apply(q, k, v, mask, causal=bool(causal), scale=scale,
                                           dropout_p=float(dropout_p), rng=rng)


class SelfAttention(Function):
    """(B, T, 3C) packed [q | k | v], each C = NH*HS wide and head-major -> (B, T, C): split the heads,
    scaled_dot_product_attention, merge the heads.

    The op a GPT block runs on c_attn's output; equal to the composite (split, reshape, permute, attend,
    permute, reshape) but one node. Forward makes one contiguous (3, B, NH, T, HS) copy of qkv; the
    attention itself is ScaledDotProductAttention's forward/backward (or the kernel it names).
    Backward writes dq, dk, dv straight into one (B, T, 3C) gradient: through split, each of the three
    pieces' GetItem backward would zero a (B, T, 3C) buffer and the autograd would add the three.
    """
    kernels = {"cuda": "attention.SelfAttentionCuda"}
    bf16_kernels = {"cpu": "mixed_attention.SelfAttentionBF16Mkl", "cuda": "mixed.SelfAttentionBF16Cuda"}   # bf16 autocast

    @staticmethod
    def check_inputs(qkv, n_head, **attrs):
        if not isinstance(n_head, (int, np.integer)) or n_head <= 0:
            raise ValueError(f"self_attention: n_head must be a positive integer, got {n_head!r}")
        if getattr(qkv, "ndim", 0) != 3 or qkv.shape[-1] % (3 * n_head):
            raise ValueError(f"self_attention: qkv has shape {tuple(getattr(qkv, 'shape', ()))}; expected (B, T, 3C) "
                             f"with C divisible by n_head={n_head}")

    @staticmethod
    def forward(ctx, qkv, n_head, causal=True, scale=1.0, dropout_p=0.0, rng=None):
        xp = array_module(qkv)
        B, T, C3 = qkv.shape
        heads = (3, B, n_head, T, C3 // 3 // n_head)
        qkv_heads = xp.ascontiguousarray(qkv.reshape(B, T, 3, n_head, heads[-1]).transpose(2, 0, 3, 1, 4))
        attention = backend.accelerated(ScaledDotProductAttention, qkv_heads)
        inner = Context((True, True, True, False))
        y = attention.forward(inner, qkv_heads[0], qkv_heads[1], qkv_heads[2], None, causal=causal, scale=scale,
                              dropout_p=dropout_p, rng=rng)
        ctx.attention, ctx.inner, ctx.heads = attention, inner, heads
        return y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)                  # (B, NH, T, HS) -> (B, T, C)

    # derivation: docs/backward/self_attention.md
    @staticmethod
    def backward(ctx, dout):
        xp = array_module(dout)
        _, B, NH, T, HS = ctx.heads
        # split and merge are permutations: their backward is the inverse permutation of the gradient
        dy = xp.ascontiguousarray(dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3))
        dq, dk, dv, _ = ctx.attention.backward(ctx.inner, dy)
        dqkv = xp.empty((B, T, 3, NH, HS), dtype=dout.dtype)
        for i, d in enumerate((dq, dk, dv)):
            dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
        return dqkv.reshape(B, T, 3 * NH * HS)


def self_attention(qkv, n_head, causal=True, scale=None, dropout_p=0.0, rng=None):
    """(B, T, 3C) -> (B, T, C): multi-head attention of the packed q | k | v that a GPT's c_attn makes.

    The same as splitting qkv into q, k, v along the last axis, viewing each as (B, T, NH, HS) and
    permuting it to (B, NH, T, HS), scaled_dot_product_attention(q, k, v, causal, scale=scale,
    dropout_p=dropout_p, rng=rng), and merging the (B, NH, T, HS) output back to (B, T, C). scale
    defaults to 1/sqrt(HS); with dropout_p > 0 the mask is drawn as scaled_dot_product_attention's.
    """
    _require_float("self_attention", "qkv", qkv)
    SelfAttention.check_inputs(qkv, n_head)
    if qkv.shape[1] == 0:
        raise ValueError("self_attention: qkv has no positions (T = 0)")
    if not 0 <= dropout_p <= 1:
        raise ValueError(f"self_attention: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0 and not isinstance(rng, np.random.Generator):
        raise ValueError("self_attention: dropout_p > 0 needs rng, an np.random.Generator (e.g. np.random.default_rng(seed))")
    HS = qkv.shape[-1] // 3 // n_head
    scale = 1 / math.sqrt(HS) if scale is None else float(scale)
    return SelfAttention.apply(qkv, n_head=int(n_head), causal=bool(causal), scale=scale, dropout_p=float(dropout_p),
                               rng=rng)


# ---- rotary position embedding -------------------------------------------------------------------

def _rotate(xp, x, cos, sin, interleaved):
    """Rotate each pair of x by the angle whose cos/sin are given, (T, HS/2) broadcast over (B, NH)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = xp.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RoPE(Function):
    """(B,NH,T,HS), (T,) int -> (B,NH,T,HS): rotate pair i of position pos by pos * theta^(-2i/HS)."""

    @staticmethod
    def forward(ctx, x, pos, theta=10000.0, interleaved=False):
        xp = array_module(x)
        HS = x.shape[-1]
        inv_freq = 1.0 / theta ** (xp.arange(0, HS, 2, dtype=np.float64) / HS)
        angle = xp.asarray(pos, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, HS/2)
        ctx.cos, ctx.sin = xp.cos(angle).astype(x.dtype), xp.sin(angle).astype(x.dtype)
        ctx.interleaved = interleaved
        return _rotate(xp, x, ctx.cos, ctx.sin, interleaved)

    # derivation: docs/backward/rope.md
    @staticmethod
    def backward(ctx, dout):
        # dx = R(-angle) dout: a rotation's inverse is its transpose
        return _rotate(array_module(dout), dout, ctx.cos, -ctx.sin, ctx.interleaved), None


def rope(x, pos, theta=10000.0, interleaved=False):
    """(B,NH,T,HS), (T,) int -> (B,NH,T,HS). Rotary embedding at absolute positions `pos`.

    interleaved=False rotates pairs (i, i + HS/2) (Hugging Face Llama's rotate_half);
    interleaved=True rotates pairs (2i, 2i+1) (RoFormer, Meta's Llama).
    """
    pos = _data(pos)
    _require_float("rope", "x", x)
    _require_int("rope", "pos", pos)
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"rope: x has shape {tuple(x.shape)}; expected (..., T, HS) with HS even")
    if tuple(pos.shape) != (x.shape[-2],):
        raise ValueError(f"rope: pos has shape {tuple(pos.shape)} but x has shape {tuple(x.shape)}; expected pos ({x.shape[-2]},)")
    return RoPE.apply(x, pos, theta=float(theta), interleaved=bool(interleaved))


# ---- LoRA linear ---------------------------------------------------------------------------------

class LoRALinear(Function):
    """(..., IN), (IN, OUT), (OUT,), (IN, R), (R, OUT) -> (..., OUT): out = x w + b + scale (x A) B.

    A linear with a low-rank adapter (LoRA): w and b are usually frozen, A and B trained; scale = alpha / R.
    Every gradient is computed only when its input needs one, so a frozen w costs no (IN, OUT) product.
    """

    @staticmethod
    def forward(ctx, x, w, b, A, B, scale=1.0):
        x2 = x.reshape(-1, x.shape[-1])                   # (N, IN)
        with _one_blas_thread():
            xa = x2 @ A                                   # (N, R): the low-rank code, saved for dB
            # one big product with the adapted weight w + scale A B (IN R OUT multiply-adds to form, N-free)
            # instead of two: x2 @ w and (x2 A) @ B each pay a BLAS call; the sum is the same up to rounding
            w_eff = w + (scale * A) @ B                   # (IN, OUT)
        out = x2 @ w_eff
        if b is not None:
            out += b
        ctx.x2, ctx.w_eff, ctx.A, ctx.B, ctx.xa, ctx.scale, ctx.x_shape = x2, w_eff, A, B, xa, scale, x.shape
        return out.reshape(x.shape[:-1] + (w.shape[1],))

    # derivation: docs/backward/lora_linear.md
    @staticmethod
    def backward(ctx, dout):
        need, s = ctx.needs_input_grad, ctx.scale
        d2 = dout.reshape(-1, dout.shape[-1])             # (N, OUT)
        # dx = dout (w + s A B)^T,  dw = x^T dout,  db = sum(dout),  dA = s x^T (dout B^T),  dB = s (x A)^T dout
        dx = (d2 @ ctx.w_eff.T).reshape(ctx.x_shape) if need[0] else None
        dw = ctx.x2.T @ d2 if need[1] else None
        db = sum_rows(d2) if need[2] else None
        with _one_blas_thread():
            dA = ctx.x2.T @ (s * (d2 @ ctx.B.T)) if need[3] else None
            dB = s * (ctx.xa.T @ d2) if need[4] else None
        return dx, dw, db, dA, dB


def _one_blas_thread():
    """The rank-R products run on one OpenBLAS thread: threads cost more than they give on such thin shapes
    (measured on the shared 2-core machine: 1.0 vs 36.6 ms of CPU time for one step's four of them at N=1024,
    IN=128, OUT=384, R=8). A no-op without OpenBLAS; imported late, as the kernels package loads on first use."""
    from .kernels.cpu.threads import blas_threads
    return blas_threads(1)


def lora_linear(x, w, b, A, B, scale=1.0):
    """(..., IN), (IN, OUT), (OUT,) or None, (IN, R), (R, OUT) -> (..., OUT): x w + b + scale x A B (w is (in, out))."""
    for name, t in (("x", x), ("w", w), ("b", b), ("A", A), ("B", B)):
        _require_float("lora_linear", name, t)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"lora_linear: x has shape {tuple(x.shape)} but w has shape {tuple(w.shape)}; expected x (..., IN) and w (IN, OUT)")
    IN, OUT = w.shape
    if b is not None and tuple(b.shape) != (OUT,):
        raise ValueError(f"lora_linear: b has shape {tuple(b.shape)}; expected ({OUT},)")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != IN or B.shape[1] != OUT or A.shape[1] != B.shape[0]:
        raise ValueError(f"lora_linear: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit w {tuple(w.shape)}; "
                         f"expected A ({IN}, R) and B (R, {OUT})")
    return LoRALinear.apply(x, w, b, A, B, scale=float(scale))


__all__ = ["linear", "embedding", "layer_norm", "rms_norm", "gelu", "silu", "swiglu", "softmax", "log_softmax",
           "cross_entropy", "dropout", "dropout_add", "scaled_dot_product_attention", "rope", "lora_linear",
           "Linear", "Embedding", "LayerNorm", "RMSNorm", "GELU", "SiLU", "SwiGLU", "Softmax", "LogSoftmax",
           "CrossEntropy", "Dropout", "DropoutAdd", "ScaledDotProductAttention", "RoPE", "LoRALinear"]
