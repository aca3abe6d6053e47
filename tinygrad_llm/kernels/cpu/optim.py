"""The AdamW update in one pass over each parameter on NumPy arrays (ops: optim.adamw_update and
adamw_update_group, the same update over a parameter group).

The op makes ~10 passes over p, g, m, v (each NumPy expression its own loop and temporary); here each
element is read and written once. The scalars are cast to the parameter's dtype before the loop, so
float32 stays float32 as NumPy's weak Python-float scalars keep it in the op, and the operations come in
the op's order: the results agree to the last bit or nearly so.

The group kernel updates up to GROUP_CHUNK parameters per Numba call (tuples of flat arrays, the last
chunk padded with empty arrays, so that one compiled signature serves every group size): a call per
parameter cost more in dispatch than the update of most parameters. Figures: benchmarks/RESULTS.md.
"""
import math

import numpy as np
from numba import njit

from ...optim import adamw_update, adamw_update_group


GROUP_CHUNK = 16


@njit(inline="always")
def _adamw_elements(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size):
    """p, g, m, v: 1-D, same length and dtype; updated in place in the order of torch.optim.AdamW."""
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] + one_minus_beta1 * (gi - m[i])
        vi = v[i] * beta2 + one_minus_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / sqrt_bc2 + eps))


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def adamw_kernel(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size):
    _adamw_elements(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size)


@njit(parallel=False, fastmath=False, error_model="numpy", cache=True)
def adamw_group_kernel(ps, gs, ms, vs, decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size):
    """ps, gs, ms, vs: tuples of GROUP_CHUNK flat arrays, the k-th of each the same length."""
    for k in range(len(ps)):
        _adamw_elements(ps[k], gs[k], ms[k], vs[k], decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps,
                        step_size)


def _scalars(dtype, lr, beta1, beta2, eps, weight_decay, step):
    """The kernels' scalar arguments, in the parameters' dtype (see the module docstring)."""
    t = dtype.type
    return (t(1 - lr * weight_decay), t(1 - beta1), t(beta2), t(1 - beta2), t(math.sqrt(1 - beta2 ** step)), t(eps),
            t(lr / (1 - beta1 ** step)))


def _covered(arrays, dtype):
    return all(type(a) is np.ndarray and a.flags.c_contiguous and a.dtype == dtype for a in arrays)


def adamw_update_numba(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """adamw_update's signature and effect; the reference runs for what the kernel does not cover."""
    arrays = (p, g, m, v)
    if not (p.dtype in (np.float32, np.float64) and _covered(arrays, p.dtype) and all(a.shape == p.shape for a in arrays)):
        return adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                 *_scalars(p.dtype, lr, beta1, beta2, eps, weight_decay, step))


def adamw_update_group_numba(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """adamw_update_group's signature and effect: GROUP_CHUNK parameters per kernel call. A group with
    mixed dtypes, a non-contiguous array or a shape mismatch goes to the reference (one call each)."""
    if not ps:
        return
    dtype = ps[0].dtype
    if not (dtype in (np.float32, np.float64) and all(_covered(arrays, dtype) for arrays in (ps, gs, ms, vs))
            and all(p.shape == g.shape == m.shape == v.shape for p, g, m, v in zip(ps, gs, ms, vs))):
        return adamw_update_group(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step)
    scalars = _scalars(dtype, lr, beta1, beta2, eps, weight_decay, step)
    padding = [np.empty(0, dtype)] * GROUP_CHUNK
    for start in range(0, len(ps), GROUP_CHUNK):
        chunk = [tuple(([a.reshape(-1) for a in arrays[start:start + GROUP_CHUNK]] + padding)[:GROUP_CHUNK])
                 for arrays in (ps, gs, ms, vs)]
        adamw_group_kernel(*chunk, *scalars)
