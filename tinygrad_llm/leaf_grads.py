"""How backward writes the leaves' gradients, all at the end of a backward pass (so an error before leaves
every .grad as it was): a leaf without a gradient gets a copy of its incoming one (that array may be shared:
the root's gradient, one array handed to two inputs by Add, a view), a leaf with one adds into it in place
(gradient accumulation; a CUDA graph's kept gradient buffers). Copies of one dtype are made together, and
additions likewise: copy_arrays and add_arrays name kernels that do each in one launch on the GPU (one
multi-tensor kernel instead of one launch a parameter).
"""
from . import backend


@backend.kernels(cuda="grads.copy_arrays_cuda")
def copy_arrays(arrays):
    """Copies of `arrays` (new memory, same values, dtypes and layouts)."""
    return [a.astype(a.dtype, copy=True) for a in arrays]


@backend.kernels(cuda="grads.add_arrays_cuda")
def add_arrays(targets, sources):
    """targets[i] += sources[i] for every i, in place (same shapes)."""
    for t, s in zip(targets, sources):
        t += s


def write(leaves):
    """leaf.grad for every (leaf, gradient) pair of `leaves`: a copy of the gradient, or added into the
    existing one; a gradient of another dtype than its leaf is converted (and, added, cast as `+=` casts)."""
    first = [g for leaf, g in leaves if leaf.grad is None and g.dtype == leaf.dtype]
    copies = iter(backend.accelerated(copy_arrays, *first)(first) if first else ())
    added = [(leaf.grad, g) for leaf, g in leaves if leaf.grad is not None]
    for leaf, g in leaves:
        if leaf.grad is None:
            leaf.grad = next(copies) if g.dtype == leaf.dtype else g.astype(leaf.dtype)
    if added:
        targets, sources = [t for t, _ in added], [s for _, s in added]
        backend.accelerated(add_arrays, *targets)(targets, sources)
