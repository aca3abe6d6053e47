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
# The command line: every case of the catalogue (cases.py) on its small float64 inputs, one table row each.

def op_cases():
    """(name, fn, inputs) for every case of tinygrad_llm.cases, float64 inputs."""
    from . import cases, functional

    return [(case.name, lambda *xs, case=case: case.fn(functional, *xs), case.arrays("float64")) for case in cases.CASES]


def build_parser():
    parser = argparse.ArgumentParser(description="Check every op's backward against central finite differences (float64).")
    parser.add_argument("--op", help="check only ops whose name contains this text")
    parser.add_argument("--property", action="store_true",
                        help="draw shapes and values with hypothesis (tinygrad_llm.testing) instead of one fixed input "
                             "per op (default: off)")
    parser.add_argument("--examples", type=int, default=20, help="drawn examples per op with --property (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed with --property (default: %(default)s)")
    return parser


def check_cases(cases):
    """Gradcheck each (name, fn, inputs), print a table row each and a summary; the number of failures."""
    print(f"{'op':36s} {'shapes':28s} {'max abs err':>12s} {'max rel err':>12s}  pass")
    failures = 0
    for name, fn, inputs in cases:
        result = gradcheck(fn, inputs)
        shapes = " ".join("x".join(map(str, np.shape(x))) or "()" for x in inputs)
        failures += not result.passed
        print(f"{name:36s} {shapes:28s} {result.max_abs_err:12.2e} {result.max_rel_err:12.2e}  {'ok' if result.passed else 'FAIL'}")
    print(f"{len(cases) - failures} passed, {failures} failed")
    return failures


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.property:
        return _property_main(args)
    cases = [c for c in op_cases() if args.op is None or args.op in c[0]]
    if not cases:
        print(f"no op matches {args.op!r}", file=sys.stderr)
        return 2
    return 1 if check_cases(cases) else 0


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
