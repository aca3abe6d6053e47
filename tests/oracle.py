"""The PyTorch oracle: one line per op compares our forward and gradients with torch's.

    check_op([(4, 8), (8,)], lambda x, b: x + b, lambda x, b: x + b)

Random inputs of the given shapes (or the given arrays) go through both functions; the outputs must
match, then the gradients of (out * dout).sum() for a random dout, so every output element carries its
own upstream gradient. Non-floating inputs (token ids, targets) are passed to both without gradients.
"""
import numpy as np
import pytest

from tinygrad_llm.tensor import Tensor

torch = pytest.importorskip("torch")

TOLERANCES = {"float64": dict(atol=1e-10, rtol=1e-8), "float32": dict(atol=1e-5, rtol=1e-4)}


def random_inputs(shapes, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def check_op(shapes_or_arrays, torch_fn, our_fn, dtype="float64", atol=None, rtol=None, seed=0):
    """Assert our_fn == torch_fn in forward and in every floating input's gradient; returns our output."""
    tol = dict(TOLERANCES[dtype])
    tol.update({k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None})
    if all(isinstance(s, tuple) for s in shapes_or_arrays):
        arrays = random_inputs(shapes_or_arrays, dtype, seed)
    else:
        arrays = [np.asarray(a) for a in shapes_or_arrays]
        arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in arrays]
    floating = [a.dtype.kind == "f" for a in arrays]

    ours = [Tensor(a, requires_grad=f) for a, f in zip(arrays, floating)]
    theirs = [torch.tensor(a, requires_grad=f) for a, f in zip(arrays, floating)]
    out, expected = our_fn(*ours), torch_fn(*theirs)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), err_msg="forward", **tol)

    dout = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
    (out * Tensor(dout)).sum().backward()
    (expected * torch.tensor(dout)).sum().backward()
    for i, (mine, ref) in enumerate(zip(ours, theirs)):
        if floating[i]:
            assert mine.grad is not None, f"input {i} got no gradient"
            np.testing.assert_allclose(mine.grad, ref.grad.numpy(), err_msg=f"gradient of input {i}", **tol)
    return out
