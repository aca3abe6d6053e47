"""Composite twins of the fused ops in functional.py, built only from Tensor primitives.

Each function here computes the same thing as its namesake in functional.py, but its gradient comes
from the autograd chaining the primitives' own backward rules (tensor.py), not from a handwritten
backward. The tests assert fused == composite == torch: when the fused backward and the chained
primitives agree, a mistake would have to be made twice, the same way, to go unnoticed.

These are slower and keep more memory; the model uses functional.py. No input checks here either.
"""
import math

import numpy as np

from .tensor import Tensor, cat, where


def _const(array, like):
    """A constant (no gradient) in the dtype of the Tensor `like`."""
    return Tensor(np.asarray(array, dtype=like.dtype))


def _data(x):
    return x.data if isinstance(x, Tensor) else np.asarray(x)


def linear(x, w, b=None):
    out = x @ w
    return out + b if b is not None else out


def embedding(idx, w):
    return w[_data(idx)]


def layer_norm(x, w=None, b=None, eps=1e-5):
    xc = x - x.mean(axis=-1, keepdims=True)
    out = xc / ((xc * xc).mean(axis=-1, keepdims=True) + eps).sqrt()
    out = out * w if w is not None else out
    return out + b if b is not None else out


def rms_norm(x, w=None, eps=None):
    eps = float(np.finfo(x.dtype).eps) if eps is None else eps
    out = x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt()
    return out * w if w is not None else out


def _abs(x):
    return where(x.data >= 0, x, -x)


def _erf(x):
    """erf from primitives: the positive series exp(-x^2) x sum c_n (2x^2)^n (odd in x) below |x| = 2.5,
    sign(x) (1 - erfc(|x|)) by its continued fraction above; each branch sees its input clamped into range."""
    ax = _abs(x)
    small = ax.data < 2.5
    xs = where(small, x, 0.0)
    y = 2 * xs * xs
    acc, c = _const(0.0, x), [1.0]
    for n in range(1, 40):
        c.append(c[-1] / (2 * n + 1))
    for cn in reversed(c):
        acc = acc * y + cn
    series = (2 / math.sqrt(math.pi)) * (-(xs * xs)).exp() * xs * acc
    xl = where(small, 2.5, where(ax.data > 40, 40.0, ax))
    t = xl
    for n in range(40, 0, -1):
        t = xl + (n / 2) / t
    erfc_large = (-(xl * xl)).exp() / (math.sqrt(math.pi) * t)
    return where(small, series, (1 - erfc_large) * _const(np.sign(x.data), x))


def gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)).tanh())
    return x * 0.5 * (1 + _erf(x / math.sqrt(2)))


def _sigmoid(x):
    e = (-_abs(x)).exp()
    return where(x.data >= 0, 1 / (1 + e), e / (1 + e))


def silu(x):
    return x * _sigmoid(x)


def swiglu(gate, up):
    return silu(gate) * up


def log_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True).detach()  # any constant shift gives the same result
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def softmax(x, axis=-1):
    e = (x - x.max(axis=axis, keepdims=True).detach()).exp()
    return e / e.sum(axis=axis, keepdims=True)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    targets = _data(targets)
    V = logits.shape[-1]
    t = targets.reshape(-1)
    valid = t != ignore_index
    logp = log_softmax(logits.reshape(-1, V))
    nll = -logp[np.arange(t.shape[0]), np.where(valid, t, 0)] * _const(valid, logits)
    if reduction == "none":
        return nll.reshape(targets.shape)
    total = nll.sum()
    return total / max(int(valid.sum()), 1) if reduction == "mean" else total


def dropout(x, p=0.5, training=True, rng=None):
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0.0
    keep = rng.random(x.shape, dtype=np.float32) >= p  # the same draw as functional.dropout
    return x * _const(keep / (1 - p), x)


def dropout_add(x, y, p=0.5, training=True, rng=None):
    return x + dropout(y, p, training, rng)


def scaled_dot_product_attention(q, k, v, causal=True, mask=None, scale=None, dropout_p=0.0, rng=None):
    TQ, TK, HS = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1 / math.sqrt(HS) if scale is None else scale
    allowed = np.ones((TQ, TK), dtype=bool) if mask is None else _data(mask)
    if causal:
        allowed = allowed & (np.arange(TK)[None, :] <= np.arange(TQ)[:, None] + (TK - TQ))
    allowed = np.broadcast_to(allowed, q.shape[:-1] + (TK,))
    s = (q @ k.transpose(-1, -2)) * scale
    s = where(allowed, s, float(np.finfo(q.dtype).min))
    # a row with no allowed key comes out uniform here; the mask multiplies it to zeros
    p = softmax(s) * _const(allowed, q)
    if dropout_p > 0:  # the same draw as functional.scaled_dot_product_attention: one float32 per probability
        keep = rng.random(p.shape, dtype=np.float32) >= dropout_p
        p = p * _const(keep * (0.0 if dropout_p == 1 else 1 / (1 - dropout_p)), q)
    return p @ v


def self_attention(qkv, n_head, causal=True, scale=None, dropout_p=0.0, rng=None):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = [t.reshape(B, T, n_head, C // n_head).permute(0, 2, 1, 3) for t in qkv.split(C, axis=2)]
    y = scaled_dot_product_attention(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, rng=rng)
    return y.permute(0, 2, 1, 3).reshape(B, T, C)


def rope(x, pos, theta=10000.0, interleaved=False):
    HS = x.shape[-1]
    angle = np.asarray(_data(pos), dtype=np.float64)[:, None] / theta ** (np.arange(0, HS, 2) / HS)
    cos, sin = _const(np.cos(angle), x), _const(np.sin(angle), x)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        pair_shape = x1.shape + (1,)
        out = cat([(x1 * cos - x2 * sin).reshape(pair_shape), (x2 * cos + x1 * sin).reshape(pair_shape)], axis=-1)
        return out.reshape(x.shape)
    x1, x2 = x[..., : HS // 2], x[..., HS // 2:]
    return cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def lora_linear(x, w, b, A, B, scale=1.0):
    out = x @ w + ((x @ A) @ B) * scale
    return out + b if b is not None else out
