"""Finite-difference gradient checks: `gradcheck(fn, inputs)` and `python -m tinygrad_llm.gradcheck`.

The check: contract the output with a fixed random `dout` to the scalar L = sum(fn(*inputs) * dout), so
every output element has its own upstream gradient, then compare each input's analytic dL/dx (from
backward) with central differences (L(x + eps) - L(x - eps)) / (2 eps), element by element, in float64.
"""
import argparse
import sys
from dataclasses import dataclass, field

import numpy as np

from .tensor import Tensor


@dataclass
class InputReport:
    index: int
    shape: tuple
    max_abs_err: float
    max_rel_err: float  # max |analytic - numeric| / max(max |numeric|, 1e-12)
    passed: bool


@dataclass
class GradcheckResult:
    inputs: list = field(default_factory=list)

    @property
    def passed(self):
        return all(r.passed for r in self.inputs)

    @property
    def max_abs_err(self):
        return max((r.max_abs_err for r in self.inputs), default=0.0)

    @property
    def max_rel_err(self):
        return max((r.max_rel_err for r in self.inputs), default=0.0)

    def __bool__(self):
        return self.passed


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0, raise_on_failure=False):
    """Check fn's backward against central differences; returns a GradcheckResult (truthy when it passes).

    inputs: arrays or Tensors. Floating ones are checked and must be float64 (float32 central
    differences are too coarse to tell a wrong gradient from rounding). Integer ones (token ids,
    targets) are passed through unchanged. An element passes when |analytic - numeric| <= atol + rtol |numeric|.

    >>> gradcheck(lambda x: x * x, [np.array([1.0, 2.0])]).passed
    True
    """
    arrays = [np.array(x.numpy() if isinstance(x, Tensor) else x, copy=True) for x in inputs]
    checked = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    for i in checked:
        if arrays[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} has dtype {arrays[i].dtype}; finite differences need float64")

    def wrap(values, requires_grad):
        return [Tensor(a, requires_grad=requires_grad and i in checked) for i, a in enumerate(values)]

    # analytic gradients from backward
    tensors = wrap(arrays, True)
    out = fn(*tensors)
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    (out * Tensor(dout)).sum().backward()

    def loss(values):
        return float((fn(*wrap(values, False)).numpy() * dout).sum())

    result = GradcheckResult()
    for i in checked:
        analytic = tensors[i].grad if tensors[i].grad is not None else np.zeros_like(arrays[i])
        numeric = np.zeros_like(arrays[i])
        flat, num_flat = arrays[i].reshape(-1), numeric.reshape(-1)
        for j in range(flat.size):
            original = flat[j]
            flat[j] = original + eps
            plus = loss(arrays)
            flat[j] = original - eps
            minus = loss(arrays)
            flat[j] = original
            num_flat[j] = (plus - minus) / (2 * eps)
        diff = np.abs(analytic - numeric)
        max_abs = float(diff.max(initial=0.0))
        max_rel = max_abs / max(float(np.abs(numeric).max(initial=0.0)), 1e-12)
        passed = bool(np.all(diff <= atol + rtol * np.abs(numeric)))
        result.inputs.append(InputReport(i, arrays[i].shape, max_abs, max_rel, passed))
    if raise_on_failure and not result.passed:
        bad = [r for r in result.inputs if not r.passed]
        raise AssertionError(f"gradcheck failed: {bad}")
    return result


# ------------------------------------------------------------------------------------------------
# The command line: every op on small random inputs, one table row each.

def op_cases():
    """(name, fn, inputs) for every op, small float64 inputs drawn from one seeded generator."""
    from . import functional as F
    from .tensor import cat, where

    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    positive = lambda *shape: rng.uniform(0.5, 2.0, shape)  # noqa: E731
    cases = [
        ("add (broadcast)", lambda x, y: x + y, [r(3, 4), r(4)]),
        ("sub (broadcast)", lambda x, y: x - y, [r(3, 1), r(1, 4)]),
        ("mul (broadcast)", lambda x, y: x * y, [r(2, 3, 4), r(3, 1)]),
        ("div", lambda x, y: x / y, [r(3, 4), positive(3, 4)]),
        ("pow (tensor exponent)", lambda x, y: x ** y, [positive(3, 4), r(3, 4)]),
        ("pow (scalar exponent)", lambda x: x ** 3, [r(3, 4)]),
        ("neg", lambda x: -x, [r(5)]),
        ("matmul (batched)", lambda a, b: a @ b, [r(2, 3, 4), r(4, 5)]),
        ("matmul (vector)", lambda a, b: a @ b, [r(4), r(2, 4, 3)]),
        ("exp", lambda x: x.exp(), [r(3, 4)]),
        ("log", lambda x: x.log(), [positive(3, 4)]),
        ("sqrt", lambda x: x.sqrt(), [positive(3, 4)]),
        ("tanh", lambda x: x.tanh(), [r(3, 4)]),
        ("sum (axis)", lambda x: x.sum(axis=1), [r(3, 4, 2)]),
        ("mean (keepdims)", lambda x: x.mean(axis=(0, 2), keepdims=True), [r(3, 4, 2)]),
        ("max (axis)", lambda x: x.max(axis=-1), [r(3, 5)]),
        ("reshape", lambda x: x.reshape(4, 3), [r(3, 4)]),
        ("permute", lambda x: x.permute(2, 0, 1), [r(2, 3, 4)]),
        ("getitem (repeated ints)", lambda x: x[np.array([0, 2, 0])], [r(3, 4)]),
        ("getitem (slice)", lambda x: x[:, 1:3], [r(3, 4)]),
        ("cat", lambda x, y: cat([x, y], axis=1), [r(2, 3), r(2, 2)]),
        ("split", lambda x: x.split([1, 3], axis=1)[1], [r(2, 4)]),
        ("where", lambda x, y: where(x.data > 0, x, y), [r(3, 4), r(4)]),
    ]
    ids = np.array([[0, 3, 3], [1, 0, 4]])
    targets = np.array([[1, -100, 4], [0, 2, 2]])
    mask = rng.random((2, 1, 3, 5)) > 0.4
    mask[..., 0] = True
    cases += [
        ("linear", F.linear, [r(2, 3, 4), r(4, 5), r(5)]),
        ("embedding (repeated ids)", lambda w: F.embedding(ids, w), [r(5, 3)]),
        ("layer_norm", F.layer_norm, [r(2, 3, 6), r(6), r(6)]),
        ("rms_norm", F.rms_norm, [r(2, 3, 6), r(6)]),
        ("gelu (none, erf)", lambda x: F.gelu(x, approximate="none"), [3 * r(2, 5)]),
        ("gelu (tanh)", lambda x: F.gelu(x, approximate="tanh"), [3 * r(2, 5)]),
        ("silu", F.silu, [3 * r(2, 5)]),
        ("swiglu", F.swiglu, [r(2, 5), r(2, 5)]),
        ("softmax", lambda x: F.softmax(x, axis=1), [r(2, 4, 3)]),
        ("log_softmax", F.log_softmax, [r(2, 4, 3)]),
        ("cross_entropy (ignore_index)", lambda x: F.cross_entropy(x, targets), [r(2, 3, 5)]),
        ("cross_entropy (none)", lambda x: F.cross_entropy(x, targets, reduction="none"), [r(2, 3, 5)]),
        ("dropout", lambda x: F.dropout(x, 0.3, rng=np.random.default_rng(1)), [r(3, 4)]),
        ("attention (causal)", F.scaled_dot_product_attention, [r(2, 2, 4, 3), r(2, 2, 4, 3), r(2, 2, 4, 3)]),
        ("attention (causal+mask, TQ<TK)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask=mask),
         [r(2, 2, 3, 4), r(2, 2, 5, 4), r(2, 2, 5, 4)]),
        ("attention (causal, dropout_p)",   # a fresh generator each call: the same mask every evaluation
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, rng=np.random.default_rng(2)),
         [r(2, 2, 4, 3), r(2, 2, 4, 3), r(2, 2, 4, 3)]),
        ("self_attention (2 heads, dropout_p)",
         lambda x: F.self_attention(x, 2, dropout_p=0.3, rng=np.random.default_rng(3)), [r(2, 4, 12)]),
        ("rope", lambda x: F.rope(x, np.arange(3, 7)), [r(1, 2, 4, 6)]),
        ("rope (interleaved)", lambda x: F.rope(x, np.arange(4), interleaved=True), [r(1, 2, 4, 6)]),
    ]
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check every op's backward against central finite differences (float64).")
    parser.add_argument("--op", help="check only ops whose name contains this text")
    parser.add_argument("--property", action="store_true",
                        help="draw shapes and values with hypothesis (tinygrad_llm.testing) instead of one fixed input "
                             "per op (default: off)")
    parser.add_argument("--examples", type=int, default=20, help="drawn examples per op with --property (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed with --property (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.property:
        return _property_main(args)
    cases = [c for c in op_cases() if args.op is None or args.op in c[0]]
    if not cases:
        print(f"no op matches {args.op!r}", file=sys.stderr)
        return 2
    print(f"{'op':34s} {'shapes':28s} {'max abs err':>12s} {'max rel err':>12s}  pass")
    failures = 0
    for name, fn, inputs in cases:
        result = gradcheck(fn, inputs)
        shapes = " ".join("x".join(map(str, np.shape(x))) or "()" for x in inputs)
        failures += not result.passed
        print(f"{name:34s} {shapes:28s} {result.max_abs_err:12.2e} {result.max_rel_err:12.2e}  {'ok' if result.passed else 'FAIL'}")
    print(f"{len(cases) - failures} passed, {failures} failed")
    return 1 if failures else 0


def _property_main(args):
    """--property: tinygrad_llm.testing.property_table (its per-op strategies live there)."""
    if args.examples < 1:
        print(f"--examples must be at least 1, got {args.examples}", file=sys.stderr)
        return 2
    try:
        from . import testing
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    failures = testing.property_table(op=args.op, examples=args.examples, seed=args.seed)
    if failures is None:
        print(f"no op matches {args.op!r}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
