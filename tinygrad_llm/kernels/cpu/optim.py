"""AdamW update in one pass over each parameter (references: tinygrad_llm.optim.adamw_update and
adamw_update_group, the same update over a parameter group).

The reference makes ~10 passes over p, g, m, v (each NumPy expression is its own loop with its own
temporary); here each element is read once and written once. The scalars are cast to the parameter's
dtype before the loop, so float32 arithmetic stays in float32 as NumPy's weak Python-float scalars keep
it in the reference, and the operations come in the reference's order: the results agree to the last
bit or nearly so.

The group kernel updates up to GROUP_CHUNK parameters per Numba call (tuples of flat arrays, the last
chunk padded with empty arrays, so that one compiled signature serves every group size): one call per
parameter cost ~10 us of dispatch and Python checks each, more than the update of most parameters.
Measured (2 cores, one process): the 4x128 model's two groups, 18 and 34 parameters, 0.69 ms per step
one call each -> 0.41 ms; the 6x384 model's 6.6 ms -> 5.8 ms.
"""
import math

import numpy as np
from numba import njit

from ...optim import adamw_update, adamw_update_group
from .threads import TOLERANCE, median_ms, relative_error, table_row, torch_or_none


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


def numba_adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """adamw_update's signature and effect; the reference runs for what the kernel does not cover."""
    arrays = (p, g, m, v)
    if not (p.dtype in (np.float32, np.float64) and _covered(arrays, p.dtype) and all(a.shape == p.shape for a in arrays)):
        return adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                 *_scalars(p.dtype, lr, beta1, beta2, eps, weight_decay, step))


def numba_adamw_update_group(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
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
        # a group of more than one chunk, odd shapes among them; and a strided gradient (the reference serves it)
        for shapes, strided in [([(7, 13), (1,), (3, 5, 2), (0,)] * 9, False), ([(4, 6), (5,)], True)]:
            ours, ref = ([_random_state(shape, dtype, i) for i, shape in enumerate(shapes)] for _ in range(2))
            for step in (1, 2, 3):
                rng = np.random.default_rng(step)
                gs = [rng.standard_normal(shape + (2,) if strided else shape).astype(dtype) for shape in shapes]
                gs = [g[..., 0] for g in gs] if strided else gs
                for update, states in ((numba_adamw_update_group, ours), (adamw_update_group, ref)):
                    ps, ms, vs = (list(arrays) for arrays in zip(*states))
                    update(ps, gs, ms, vs, 3e-3, 0.9, 0.95, 1e-8, 0.1, step)
            for state_ours, state_ref in zip(ours, ref):
                for a, b in zip(state_ours, state_ref):
                    err = relative_error(a, b)
                    assert err <= TOLERANCE[np.dtype(dtype)], f"adamw group {a.shape} {np.dtype(dtype).name}: {err}"
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
