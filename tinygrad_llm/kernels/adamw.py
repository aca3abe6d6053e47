"""AdamW update in one pass over each parameter (reference: tinygrad_llm.optim.adamw_update).

The reference makes ~10 passes over p, g, m, v (each NumPy expression is its own loop with its own
temporary); here each element is read once and written once. The scalars are cast to the parameter's
dtype before the loop, so float32 arithmetic stays in float32 as NumPy's weak Python-float scalars keep
it in the reference, and the operations come in the reference's order: the results agree to the last
bit or nearly so.
"""
import math

import numpy as np
from numba import njit

from ..optim import adamw_update
from .common import TOLERANCE, median_ms, relative_error, table_row, torch_or_none


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def adamw_kernel(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size):
    """p, g, m, v: 1-D, same length and dtype; updated in place in the order of torch.optim.AdamW."""
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] + one_minus_beta1 * (gi - m[i])
        vi = v[i] * beta2 + one_minus_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / sqrt_bc2 + eps))


def numba_adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """adamw_update's signature and effect; the reference runs for what the kernel does not cover."""
    arrays = (p, g, m, v)
    if not (all(type(a) is np.ndarray and a.flags.c_contiguous for a in arrays)
            and p.dtype in (np.float32, np.float64) and all(a.dtype == p.dtype and a.shape == p.shape for a in arrays)):
        return adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    t = p.dtype.type
    adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), t(1 - lr * weight_decay), t(1 - beta1),
                 t(beta2), t(1 - beta2), t(math.sqrt(1 - beta2 ** step)), t(eps), t(lr / (1 - beta1 ** step)))


def _random_state(shape, dtype, seed):
    """p, m, v as after some steps (v >= 0)."""
    rng = np.random.default_rng(seed)
    p, m = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    return p, m, rng.random(shape).astype(dtype)


def validate():
    """Three steps of kernel vs reference on random and odd shapes; the largest relative difference."""
    worst = 0.0
    for dtype in (np.float64, np.float32):
        for shape in [(1,), (7, 13), (384, 1536), (3, 5, 2)]:
            ours, ref = _random_state(shape, dtype, 0), _random_state(shape, dtype, 0)
            for step in (1, 2, 3):
                g = np.random.default_rng(step).standard_normal(shape).astype(dtype)
                numba_adamw_update(ours[0], g, ours[1], ours[2], 3e-3, 0.9, 0.95, 1e-8, 0.1, step)
                adamw_update(ref[0], g, ref[1], ref[2], 3e-3, 0.9, 0.95, 1e-8, 0.1, step)
            for a, b in zip(ours, ref):
                err = relative_error(a, b)
                assert err <= TOLERANCE[np.dtype(dtype)], f"adamw {shape} {np.dtype(dtype).name}: {err}"
                worst = max(worst, err)
    return worst


def benchmark(shapes=((384, 1536), (65, 128))):
    """Markdown rows: one update of a parameter of each shape, float32."""
    rows, torch = [], torch_or_none()
    for shape in shapes:
        p, m, v = _random_state(shape, np.float32, 0)
        g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        args = (3e-4, 0.9, 0.95, 1e-8, 0.1, 10)
        t_numba = median_ms(lambda: numba_adamw_update(p, g, m, v, *args), repeat=21)
        t_numpy = median_ms(lambda: adamw_update(p, g, m, v, *args), repeat=21)
        t_torch = None
        if torch is not None:
            tp = torch.zeros(shape, requires_grad=True)
            tp.grad = torch.from_numpy(g)
            opt = torch.optim.AdamW([tp], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
            t_torch = median_ms(opt.step, repeat=21)
        rows.append(table_row("adamw_update", shape, np.float32, t_numba, t_numpy, t_torch))
    return rows
