"""Softmax + cross-entropy fused, forward and backward (reference: functional.CrossEntropy).

The reference keeps a (N, V) probability array for backward and makes a NumPy pass per operation.
Here forward reads each row of logits twice (max, then sum of exp) and keeps only the row max and
the row sum (N,); backward writes dlogits = (exp(x - max) / sum - onehot(target)) * dout * scale in one
pass from the logits themselves (which the graph holds anyway). Rows whose target is ignore_index
give loss 0 and gradient 0.

Validated, measured, NOT registered: every row element needs an exp, which Numba calls as scalar libm
expf while NumPy's np.exp is SIMD; that costs more than the passes saved (0.46x at the 6x384 loss,
0.60x at a GPT-2 vocabulary, benchmarks/kernels.py, 2 cores). Register it once the exp vectorises
(e.g. Numba with Intel SVML).
"""
import math

import numpy as np
from numba import njit

from ..functional import CrossEntropy
from .common import TOLERANCE, compare_with_reference, forward_backward, median_ms, table_row, torch_or_none


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def cross_entropy_forward(x, targets, ignore_index, nll, row_max, row_sum):
    """x: (N,V); targets: (N,) int64. Writes nll (N,) (0 where ignored), row_max, row_sum (N,)."""
    N, V = x.shape
    for r in range(N):
        m = x[r, 0]
        for j in range(1, V):
            m = max(m, x[r, j])
        total = 0.0
        for j in range(V):
            total += math.exp(x[r, j] - m)
        row_max[r], row_sum[r] = m, total
        t = targets[r]
        nll[r] = math.log(total) - (x[r, t] - m) if t != ignore_index else 0.0


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def cross_entropy_backward(x, targets, ignore_index, row_max, row_sum, row_scale, dx):
    """dx = (softmax(x) - onehot(target)) * row_scale per row; 0 on ignored rows."""
    N, V = x.shape
    for r in range(N):
        t = targets[r]
        if t == ignore_index:
            for j in range(V):
                dx[r, j] = 0.0
            continue
        m, total, g = row_max[r], row_sum[r], row_scale[r]
        for j in range(V):
            dx[r, j] = math.exp(x[r, j] - m) / total * g
        dx[r, t] = (math.exp(x[r, t] - m) / total - 1.0) * g


class NumbaCrossEntropy:
    """Kernel for CrossEntropy, NumPy float32/float64 logits with the class axis last."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100, reduction="mean"):
        ctx.fallback = not (type(logits) is np.ndarray and type(targets) is np.ndarray and logits.size > 0
                            and logits.dtype in (np.float32, np.float64) and reduction in ("mean", "sum", "none"))
        if ctx.fallback:
            return CrossEntropy.forward(ctx, logits, targets, ignore_index=ignore_index, reduction=reduction)
        V = logits.shape[-1]
        x = np.ascontiguousarray(logits.reshape(-1, V))
        t = np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
        N, dtype = x.shape[0], logits.dtype
        nll, row_max, row_sum = np.empty(N, dtype), np.empty(N, dtype), np.empty(N, dtype)
        cross_entropy_forward(x, t, ignore_index, nll, row_max, row_sum)
        count = int((t != ignore_index).sum())
        # "mean" divides by the number of counted targets; with none counted the loss is 0, not 0/0
        ctx.scale = 1 / max(count, 1) if reduction == "mean" else 1.0
        ctx.x, ctx.t, ctx.row_max, ctx.row_sum = x, t, row_max, row_sum
        ctx.ignore_index, ctx.reduction, ctx.shape = ignore_index, reduction, logits.shape
        if reduction == "none":
            return nll.reshape(targets.shape)
        return np.asarray(nll.sum() * ctx.scale, dtype=dtype)

    @staticmethod
    def backward(ctx, dout):
        if ctx.fallback:
            return CrossEntropy.backward(ctx, dout)
        x = ctx.x
        row_scale = np.broadcast_to(np.asarray(dout, dtype=x.dtype).reshape(-1) * x.dtype.type(ctx.scale), x.shape[:1])
        dx = np.empty_like(x)
        # dlogits = (softmax(logits) - onehot(target)) * dout * scale, zero on ignored rows
        cross_entropy_backward(x, ctx.t, ctx.ignore_index, ctx.row_max, ctx.row_sum, np.ascontiguousarray(row_scale), dx)
        return dx.reshape(ctx.shape), None


def _inputs(shape, dtype, seed=0, ignore_fraction=0.2, large=False):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape).astype(dtype) * (1e4 if large else 3)
    targets = rng.integers(0, shape[-1], shape[:-1])
    targets[rng.random(shape[:-1]) < ignore_fraction] = -100
    return logits, targets


VALIDATION_CASES = [((4, 9, 65), {}), ((7, 3), {}), ((1, 1), {}), ((5, 13), dict(large=True)),
                    ((3, 6), dict(ignore_fraction=1.0)), ((2, 3, 11), dict(ignore_fraction=0.0))]


def validate():
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape, kwargs in VALIDATION_CASES:
            logits, targets = _inputs(shape, dtype, **kwargs)
            for reduction in ("mean", "sum", "none"):
                attrs = dict(ignore_index=-100, reduction=reduction)
                err = compare_with_reference(CrossEntropy, NumbaCrossEntropy, (logits, targets), attrs)
                assert err <= TOLERANCE[np.dtype(dtype)], f"cross_entropy {shape} {kwargs} {reduction} {np.dtype(dtype).name}: {err}"
                worst = max(worst, err)
    return worst


def benchmark(shapes=((12 * 64, 65), (64 * 256, 65), (8 * 256, 50257))):
    """Forward + backward, float32, (N, V): the two char-level configs and a GPT-2-vocabulary row block."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        logits, targets = _inputs(shape, np.float32, ignore_fraction=0.0)
        arrays, attrs = (logits, targets), dict(ignore_index=-100, reduction="mean")
        t_numba = median_ms(forward_backward(NumbaCrossEntropy, arrays, attrs), repeat=5)
        t_numpy = median_ms(forward_backward(CrossEntropy, arrays, attrs), repeat=5)
        t_torch = None
        if torch is not None:
            tl, tt = torch.from_numpy(logits).requires_grad_(), torch.from_numpy(targets)
            t_torch = median_ms(lambda: torch.nn.functional.cross_entropy(tl, tt).backward(), repeat=5)
        rows.append(table_row("cross_entropy fwd+bwd", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows
