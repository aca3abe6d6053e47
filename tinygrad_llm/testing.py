"""Property-based gradient checks for your own ops: hypothesis strategies, `check_gradients`, `check_against`.

    from tinygrad_llm.testing import arrays, shapes, check_gradients
    check_gradients(MyOp, arrays(shapes()))        # 100 drawn inputs, central differences on each

`check_gradients` draws inputs from one strategy per positional input of `fn`, compares every input's
analytic gradient (your backward) with central finite differences in float64, and on a failure lets
hypothesis shrink the input before raising an AssertionError that names the input whose gradient is
wrong, its worst element (analytic and numeric values) and the minimal failing input. A backward that
returns a gradient of the wrong shape (say, not summed over broadcast axes) is reported as that.

`assert_gradients(fn, *arrays)` is the same check on one given input (for use under your own `@given`);
`check_against(fn, reference_fn, *strategies)` compares forward values and gradients with another
implementation. Guide: docs/testing.md and docs/custom_op.md. Needs hypothesis:
`pip install "tinygrad_llm[testing]"`.
"""
import functools
import inspect
import math

import numpy as np

try:
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover - exercised by hand in a venv without hypothesis
    raise ImportError('tinygrad_llm.testing needs hypothesis: pip install "tinygrad_llm[testing]"') from None

from .tensor import Function, Tensor, no_grad

__all__ = ["elements", "shapes", "arrays", "broadcastable_shapes", "token_ids", "gpt_configs", "check_gradients",
           "assert_gradients", "check_against", "default_inputs", "property_table"]


# ================================================================================================
# Strategies

@functools.lru_cache(maxsize=64)  # one strategy object per range: hypothesis caches its labels on the object
def elements(min_value=-10.0, max_value=10.0, *, allow_nan=False, allow_infinity=False, tiny=True):
    """Floats for array elements: the range [min_value, max_value], with 0 and tiny magnitudes drawn often.

    Four equally likely sources: exact 0 (when in range), small integers in range (branch points such
    as 0, 1, 3 sit on integers), tiny magnitudes (|x| <= 1e-3), and the whole range. NaN and +-inf
    only when asked. A failing value shrinks towards the earlier sources: 0, then an integer.
    """
    if not min_value <= max_value:
        raise ValueError(f"elements: min_value {min_value} is above max_value {max_value}")
    wide = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False)
    sources = []
    if min_value <= 0 <= max_value:
        sources.append(st.just(0.0))
    # hypothesis shrinks towards the earlier sources: a failing value becomes an integer if one fails
    lo_int, hi_int = max(math.ceil(min_value), -20), min(math.floor(max_value), 20)
    if lo_int <= hi_int:  # sampled_from, not integers().map(float): a third of the drawing time
        ints = sorted(range(lo_int, hi_int + 1), key=lambda k: (abs(k), k < 0))  # 0, 1, -1, 2, ...: shrinks to small
        sources.append(st.sampled_from([float(k) for k in ints]))
    if tiny:
        lo, hi = max(min_value, -1e-3), min(max_value, 1e-3)
        if lo <= hi:
            sources.append(st.floats(lo, hi, allow_nan=False, allow_infinity=False))
    sources.append(wide)
    special = ([math.nan] if allow_nan else []) + ([math.inf, -math.inf] if allow_infinity else [])
    if special:
        sources.append(st.sampled_from(special))
    return st.one_of(*sources)


def shapes(min_dims=1, max_dims=4, min_side=1, max_side=8):
    """Array shapes: tuples of min_dims..max_dims sides, each in [min_side, max_side]; small ones shrink first."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def _as_shape_strategy(shape):
    if isinstance(shape, st.SearchStrategy):
        return shape
    if isinstance(shape, (int, np.integer)):
        return st.just((int(shape),))
    return st.just(tuple(int(n) for n in shape))


def arrays(shape, dtype="float64", elements=None):
    """NumPy arrays of `shape` (a tuple, or a strategy of tuples such as `shapes()`).

    elements=None draws from `elements()` for floating dtypes ([-10, 10], 0 and tiny values often,
    no NaN or inf); pass a strategy of scalars to choose your own, e.g. `elements(0.1, 5.0)` for log.
    """
    dtype = np.dtype(dtype)
    if elements is None:
        if dtype.kind == "f":
            elements = globals()["elements"]()
        elif dtype.kind in "iu":
            elements = st.integers(-10 if dtype.kind == "i" else 0, 10)
    return hnp.arrays(dtype, _as_shape_strategy(shape), elements=elements)


def broadcastable_shapes(shape, min_dims=0, max_dims=None, min_side=1, max_side=None):
    """Shapes that broadcast TO `shape` (a tuple or a strategy of tuples; give it `st.shared(...)`):
    trailing sides either equal or 1, leading axes possibly dropped. For (3, 4): (4,), (1, 4), (3, 1), ()...

    To tie two inputs, share the first shape: `s = st.shared(shapes(), key="x")`, then
    `arrays(s)` and `arrays(broadcastable_shapes(s))`.
    """
    def for_shape(target):
        target = tuple(target)
        top = len(target) if max_dims is None else min(max_dims, len(target))
        return hnp.broadcastable_shapes(target, min_dims=min(min_dims, top), max_dims=top, min_side=min_side,
                                        max_side=max_side).filter(
            lambda s: np.broadcast_shapes(s, target) == target)
    return _as_shape_strategy(shape).flatmap(for_shape)


def token_ids(vocab_size, shape):
    """int64 arrays of `shape` (tuple or strategy) with ids in [0, vocab_size); repeated ids are drawn often."""
    if vocab_size < 1:
        raise ValueError(f"token_ids: vocab_size must be at least 1, got {vocab_size}")
    return hnp.arrays(np.int64, _as_shape_strategy(shape), elements=st.integers(0, vocab_size - 1))


def gpt_configs(max_layers=2, max_heads=2, max_head_size=8, max_vocab=32, max_block=16, dtype="float64"):
    """Small valid GPTConfig objects across every switch (norm, mlp, position, bias, tied embeddings)."""
    from .model import GPTConfig

    @st.composite
    def build(draw):
        n_head = draw(st.integers(1, max_heads))
        position = draw(st.sampled_from(["learned", "rope"]))
        head_size = draw(st.integers(1, max(1, max_head_size // 2))) * 2 if position == "rope" \
            else draw(st.integers(1, max_head_size))
        return GPTConfig(vocab_size=draw(st.integers(2, max_vocab)), block_size=draw(st.integers(1, max_block)),
                         n_layer=draw(st.integers(1, max_layers)), n_head=n_head, n_embd=n_head * head_size,
                         bias=draw(st.booleans()), dtype=dtype, norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
                         mlp=draw(st.sampled_from(["gelu", "swiglu"])), position=position,
                         tie_embeddings=draw(st.booleans()),
                         gelu_approximate=draw(st.sampled_from(["tanh", "none"])))
    return build()


def default_inputs(n):
    """The inputs `check_gradients(fn)` draws when given no strategies: input 0 from `arrays(shapes())`,
    every further input from shapes that broadcast to input 0's (a binary op's usual contract)."""
    first = st.shared(shapes(), key="tinygrad_llm.testing.default_inputs")
    return [arrays(first)] + [arrays(broadcastable_shapes(first)) for _ in range(n - 1)]


# ================================================================================================
# One example: analytic against numeric gradients

class _BackwardRaised(Exception):
    """An exception from inside a backward (say, a shape check of the autograd's own): reported, not propagated."""

    def __init__(self, error):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class _WrongShape(Exception):
    def __init__(self, op, index, grad_shape, input_shape, fn_input):
        self.op, self.index, self.grad_shape, self.input_shape, self.fn_input = op, index, grad_shape, input_shape, fn_input
        super().__init__(self.describe())

    def describe(self):
        which = f" (input {self.fn_input} of the checked function)" if self.fn_input is not None else ""
        return (f"{self.op} backward returned a gradient of shape {tuple(self.grad_shape)} for its input {self.index}"
                f"{which} of shape {tuple(self.input_shape)}; a gradient must have its input's shape "
                f"(an input broadcast in the forward needs its gradient summed over the broadcast axes)")


def _callable(fn):
    return fn.apply if isinstance(fn, type) and issubclass(fn, Function) else fn


def _guard_shapes(out, leaves):
    """Wrap every backward in the graph behind `out` with a check of the returned gradients' shapes."""
    leaf_index = {id(t): i for i, t in enumerate(leaves)}
    stack, seen = [out], set()
    while stack:
        node = stack.pop()
        ctx = node._ctx
        if ctx is None or id(ctx) in seen:
            continue
        seen.add(id(ctx))
        inner = ctx.backward_fn

        def checked(c, dout, inner=inner):
            grads = inner(c, dout)
            for i, (parent, g) in enumerate(zip(c.parents, grads if isinstance(grads, tuple) else (grads,))):
                if parent is not None and g is not None and tuple(np.shape(g)) != parent.shape:
                    raise _WrongShape(c.op_name, i, np.shape(g), parent.shape, leaf_index.get(id(parent)))
            return grads
        ctx.backward_fn = checked
        stack.extend(p for p in ctx.parents if p is not None)


def _forward(fn, arrays, requires_grad, checked):
    tensors = [Tensor(a, requires_grad=requires_grad and i in checked) for i, a in enumerate(arrays)]
    out = fn(*tensors)
    if not isinstance(out, Tensor):
        raise TypeError(f"the function under test returned {type(out).__name__}; it must return a Tensor")
    return tensors, out


def _analytic(fn, arrays, checked, dout_seed):
    """(output array, dout, {input index: analytic gradient}); _WrongShape from a misshapen gradient."""
    tensors, out = _forward(fn, arrays, True, checked)
    out_data = np.array(out.numpy(), dtype=np.float64)
    dout = np.random.default_rng(dout_seed).standard_normal(out.shape)
    if out.requires_grad:
        _guard_shapes(out, tensors)
        try:
            out.backward(dout.astype(out.dtype))
        except _WrongShape:
            raise
        except Exception as error:
            raise _BackwardRaised(error) from error
    grads = {}
    for i in checked:
        g = tensors[i].grad
        grads[i] = np.zeros_like(arrays[i]) if g is None else np.asarray(g, dtype=np.float64)
    return out_data, dout, grads


def _numeric(fn, arrays, checked, dout, eps, stop=None):
    """Central differences of L = sum(fn(x) * dout), from the output DIFFERENCE (rounding stays local).

    stop(i, j, value) -> True ends the input's loop early (the rest stays NaN): a failing example need
    not be differenced to its last element while hypothesis shrinks it."""
    work = [np.array(a, copy=True) for a in arrays]

    def out_of(values):
        with no_grad():
            # a copy: the output may be a view of the input (reshape, slices) that the next step changes
            return np.array(_forward(fn, values, False, ())[1].numpy(), dtype=np.float64, copy=True)

    grads = {}
    for i in checked:
        flat, num = work[i].reshape(-1), np.full(work[i].size, np.nan)
        for j in range(flat.size):
            original = flat[j]
            flat[j] = original + eps
            plus = out_of(work)
            flat[j] = original - eps
            minus = out_of(work)
            flat[j] = original
            with np.errstate(invalid="ignore"):
                num[j] = float(((plus - minus) * dout).sum()) / (2 * eps)
            if stop is not None and stop(i, j, num[j]):
                break
        grads[i] = num.reshape(work[i].shape)
    return grads


def _show(a):
    a = np.asarray(a)
    body = " ".join(np.array2string(a, separator=", ", threshold=64, floatmode="unique").split())  # one line
    return f"shape {a.shape} {a.dtype}: {body}"


def _describe_inputs(arrays, names=None):
    return "\n".join(f"    {_name(i, names)}: {_show(a)}" for i, a in enumerate(arrays))


def _name(i, names):
    return f"input {i} ({names[i]})" if names else f"input {i}"


def _worst(a, b, atol, rtol):
    """(passed, worst index, max abs err, max rel err) of a against b, NaN == NaN and inf == inf.

    The relative error of an element is |a - b| / (|b| + atol / rtol): an element passes when
    |a - b| <= atol + rtol |b|, i.e. when that error is at most rtol, and tiny gradients do not
    inflate it. The worst element is the one with the largest such error.
    """
    with np.errstate(invalid="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / (np.where(np.isfinite(b), np.abs(b), 0) + atol / rtol)
    bad = rel > rtol
    max_abs = float(diff.max(initial=0.0))
    max_rel = float(rel.max(initial=0.0))
    worst = np.unravel_index(int(np.argmax(rel)), a.shape) if a.size else ()
    return not bad.any(), tuple(int(k) for k in worst), max_abs, max_rel


def _gradient_errors(fn, arrays, eps, atol, rtol, dout_seed=0, names=None, quick=False):
    """Check one example; returns (max relative error, failure message or None, failure kind or None).

    quick: stop differencing an input at its first failing element (while searching and shrinking)."""
    fn = _callable(fn)
    arrays = [np.asarray(a) for a in arrays]
    checked = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    for i in checked:
        if arrays[i].dtype != np.float64:
            raise TypeError(f"{_name(i, names)} has dtype {arrays[i].dtype}; finite differences need float64")
    try:
        out, dout, analytic = _analytic(fn, arrays, checked, dout_seed)
    except _WrongShape as e:
        return math.inf, f"the gradient of {_name(e.fn_input, names) if e.fn_input is not None else 'an inner op'} " \
                         f"has the wrong shape: {e.describe()}", ("shape", e.op, e.index)
    except _BackwardRaised as e:
        return math.inf, f"the backward raised {e}", ("raised", type(e.error).__name__)
    if not np.all(np.isfinite(out)):
        return math.inf, ("the function's output is not finite (NaN or inf) at this input, so finite differences "
                          "say nothing; draw inputs from its domain (arrays(..., elements=elements(lo, hi)))"), ("finite",)
    first_bad = {}

    def stop(i, j, value):
        a = analytic[i].reshape(-1)[j]
        if quick and not _worst(np.array([a]), np.array([value]), atol, rtol)[0]:
            first_bad[i] = j
            return True
        return False

    numeric = _numeric(fn, arrays, checked, dout, eps, stop)
    worst_rel = 0.0
    for i in checked:
        if i in first_bad:  # quick mode: judged on the elements differenced so far
            n = first_bad[i] + 1
            ok, where, max_abs, max_rel = _worst(analytic[i].reshape(-1)[:n], numeric[i].reshape(-1)[:n], atol, rtol)
            where = tuple(int(k) for k in np.unravel_index(where[0], arrays[i].shape))
        else:
            ok, where, max_abs, max_rel = _worst(analytic[i], numeric[i], atol, rtol)
        worst_rel = max(worst_rel, max_rel)
        if not ok:
            a, n = analytic[i][where], numeric[i][where]
            return math.inf if not np.isfinite(max_rel) else max_rel, (
                f"the gradient of {_name(i, names)} is wrong: worst element at index {where}: analytic {float(a)!r}, "
                f"numeric {float(n)!r} (|diff| {abs(a - n):.3g} > atol {atol:g} + rtol {rtol:g} * |numeric|); "
                f"max abs err {max_abs:.3g}, max rel err {max_rel:.3g}"), ("value", i)
    return worst_rel, None, None


def assert_gradients(fn, *arrays, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0, names=None):
    """Check fn's backward on this one input (float64 arrays; integer arrays pass through unchecked).

    Raises AssertionError naming the input whose gradient is wrong, the worst element and the input;
    returns the worst relative error otherwise. Use it under your own `@given` (docs/testing.md).
    """
    worst, failure, _ = _gradient_errors(fn, arrays, eps, atol, rtol, seed, names)
    if failure:
        raise AssertionError(f"{failure}\n  failing input:\n{_describe_inputs(arrays, names)}")
    return worst


def _settings(max_examples, seed, shrink=True):
    # no explain phase: its extra runs only feed the notes that _run drops
    phases = [p for p in Phase if p != Phase.explain and (shrink or p != Phase.shrink)]
    return settings(max_examples=max_examples, deadline=None, database=None, report_multiple_bugs=False,
                    print_blob=False, suppress_health_check=list(HealthCheck), phases=phases)


class _Failed(AssertionError):
    """A failing example: its message, the drawn inputs, and a key saying what kind of failure it was."""

    def __init__(self, message, drawn, key):
        super().__init__(message)
        self.drawn, self.key = drawn, key


def _run(test, strategies, max_examples, seed, shrink=True):
    """Run `test(*drawn)` under hypothesis; re-raise the shrunk failure without hypothesis' own notes."""
    def run_one(drawn):
        test(*drawn)

    runner = _settings(max_examples, seed, shrink)(given(st.tuples(*strategies))(run_one))
    if seed is not None:
        runner = hypothesis.seed(seed)(runner)
    try:
        runner()
    except AssertionError as e:
        e.__notes__ = []  # hypothesis' "Falsifying example" repeats what our message already says
        raise e.with_traceback(None) from None


def _smaller(arrays, drop_axes=True):
    """Candidate inputs one step smaller than `arrays`: one index kept along one axis (the same index on
    every input with an axis of that size aligned from the right), or a leading axis of 1 dropped."""
    for i, a in enumerate(arrays):
        if a.dtype.kind != "f":
            continue
        for axis in range(a.ndim):
            n = a.shape[axis]
            if n == 1:
                if axis == 0 and drop_axes:
                    yield [b[0] if j == i else b for j, b in enumerate(arrays)]
                continue
            # keep one index (the biggest cut), else drop one (a broadcast needs two elements against one)
            for keep in [[k] for k in range(n)] + [[m for m in range(n) if m != k] for k in range(n)]:
                out = []
                for j, b in enumerate(arrays):
                    aligned = axis - a.ndim + b.ndim
                    if j == i or (b.dtype.kind == "f" and 0 <= aligned and b.shape[aligned] == n):
                        b = np.take(b, keep, axis=aligned)
                    out.append(b)
                yield out


def _shrink_further(arrays, still_fails, budget=200, drop_axes=True):
    """Greedy shrinking after hypothesis': hypothesis cannot cut an array's shape without losing the
    element that fails (it truncates the end), so keep cutting while the same failure remains."""
    arrays = [np.asarray(a) for a in arrays]
    progress = True
    while progress and budget > 0:
        progress = False
        for candidate in _smaller(arrays, drop_axes):
            budget -= 1
            try:
                fails = still_fails(candidate)
            except Exception:
                fails = False
            if fails:
                arrays, progress = candidate, True
                break
            if budget <= 0:
                break
    return arrays


def _simpler_values(arrays, still_fails, budget=200):
    """Make the values of a failing input simple while it keeps failing: a whole float input set to 0,
    then element by element 0, then the nearest integer."""
    arrays = [np.array(a, copy=True) for a in arrays]

    def attempt(i, new):
        nonlocal budget
        budget -= 1
        candidate = arrays[:i] + [new] + arrays[i + 1:]
        try:
            ok = still_fails(candidate)
        except Exception:
            ok = False
        if ok:
            arrays[i] = new
        return ok

    for i, a in enumerate(arrays):
        if a.dtype.kind == "f" and a.any() and budget > 0:
            attempt(i, np.zeros_like(a))
    for make in (lambda v: 0.0, lambda v: float(np.round(v))):
        for i in range(len(arrays)):
            if arrays[i].dtype.kind != "f":
                continue
            for j in range(arrays[i].size):
                v = arrays[i].reshape(-1)[j]
                target = make(v)
                if budget <= 0 or target == v or not np.isfinite(v):
                    continue
                new = arrays[i].copy()
                new.reshape(-1)[j] = target
                attempt(i, new)
    return arrays


def _check_shrunk(check, strategies, max_examples, seed, what, names=None, counter=None):
    """Run check(*drawn) -> (rel, failure, key) under hypothesis, shrink a failure further, raise it."""
    worst = [0.0]

    def test(*drawn):
        if counter is not None:
            counter[0] += 1
        rel, failure, key = check(*drawn, quick=True)
        if failure:
            raise _Failed(failure, drawn, key)
        worst[0] = max(worst[0], rel)

    try:
        _run(test, strategies, max_examples, seed)
    except _Failed as e:
        drawn = _shrink_further(e.drawn, lambda arrays: check(*arrays, quick=True)[2] == e.key)
        failure = check(*drawn)[1] or str(e)  # the full report: every element differenced
        raise AssertionError(f"{what}: {failure}\n  minimal failing input (after shrinking):\n"
                             f"{_describe_inputs(drawn, names)}") from None
    return worst[0]


def _strategies_for(fn, input_strategies):
    if input_strategies:
        return list(input_strategies)
    target = fn.forward if isinstance(fn, type) and issubclass(fn, Function) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        raise TypeError("check_gradients: cannot read fn's signature; pass one strategy per input") from None
    if target is not fn:
        params = params[1:]  # ctx
    n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)
    if n == 0:
        raise TypeError("check_gradients: fn takes no positional inputs; pass one strategy per input")
    return default_inputs(n)


def check_gradients(fn, *input_strategies, max_examples=100, atol=1e-5, rtol=1e-4, eps=1e-6, seed=None, names=None):
    """Check fn's backward against central differences on `max_examples` drawn inputs.

    fn: a callable of Tensors returning a Tensor, or a Function subclass (its `apply` is called).
    input_strategies: one hypothesis strategy per positional input (`arrays(...)`, `token_ids(...)`);
    none given: `default_inputs(n)` for fn's n required positional parameters. An element passes when
    |analytic - numeric| <= atol + rtol |numeric|. seed: an int for a reproducible run.
    names: optional input names for the report. Returns the worst relative error seen.

    On a failure hypothesis shrinks the input, then an AssertionError names the input whose gradient
    is wrong, the worst element's analytic and numeric values, and the minimal failing input.
    """
    strategies = _strategies_for(fn, input_strategies)
    return _check_shrunk(lambda *drawn, quick=False: _gradient_errors(fn, drawn, eps, atol, rtol, 0, names, quick),
                         strategies, max_examples, seed, "check_gradients", names)


def _torch_call(reference_fn, arrays, checked, dout):
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        raise ImportError("check_against(framework='torch'): import torch first")
    ts = [torch.tensor(a, requires_grad=i in checked) for i, a in enumerate(arrays)]
    out = reference_fn(*ts)
    grads = {}
    if out.requires_grad:
        out.backward(torch.tensor(dout, dtype=out.dtype))
    for i in checked:
        grads[i] = np.zeros_like(arrays[i]) if ts[i].grad is None else ts[i].grad.detach().numpy().astype(np.float64)
    return out.detach().numpy().astype(np.float64), grads


def check_against(fn, reference_fn, *input_strategies, max_examples=100, atol=1e-8, rtol=1e-6, seed=None,
                  framework="tinygrad_llm", names=None):
    """Compare fn's forward values and gradients with reference_fn's on drawn inputs.

    reference_fn gets the same inputs: tinygrad_llm Tensors (framework="tinygrad_llm", e.g. a composite
    of primitives), or torch tensors (framework="torch": you import torch; this package never does).
    Both outputs are contracted with the same random dout; failure: the shrunk input, and which
    output or input gradient differs, with its worst element. Returns the worst relative error seen.
    """
    fn, ref = _callable(fn), _callable(reference_fn)
    if framework not in ("tinygrad_llm", "torch"):
        raise ValueError(f"check_against: framework must be 'tinygrad_llm' or 'torch', got {framework!r}")
    strategies = _strategies_for(fn, input_strategies)

    def check(*drawn, quick=False):
        arrays = [np.asarray(a) for a in drawn]
        checked = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
        try:
            out, dout, grads = _analytic(fn, arrays, checked, 0)
        except _WrongShape as e:
            return math.inf, e.describe(), ("shape", e.op, e.index)
        except _BackwardRaised as e:
            return math.inf, f"the backward raised {e}", ("raised", type(e.error).__name__)
        if framework == "torch":
            ref_out, ref_grads = _torch_call(ref, arrays, checked, dout)
        else:
            ref_out, _, ref_grads = _analytic(ref, arrays, checked, 0)
        pairs = [("the forward output", out, ref_out)] + [(f"the gradient of {_name(i, names)}", grads[i], ref_grads[i])
                                                         for i in checked]
        worst = 0.0
        for k, (what, a, b) in enumerate(pairs):
            if a.shape != b.shape:
                return math.inf, f"{what} has shape {a.shape}, the reference's {b.shape}", ("shape", k)
            ok, where, max_abs, max_rel = _worst(a, b, atol, rtol)
            worst = max(worst, max_rel)
            if not ok:
                return max_rel, (f"{what} differs from the reference: worst element at index {where}: fn {float(a[where])!r}, "
                                 f"reference {float(b[where])!r}; max abs err {max_abs:.3g}"), ("value", k)
        return worst, None, None

    return _check_shrunk(check, strategies, max_examples, seed, "check_against", names)


# ================================================================================================
# Every built-in op under drawn shapes and values: `python -m tinygrad_llm.gradcheck --property`

def _unique_elements(lo=-10.0, hi=10.0):
    # ops with ties or kinks (max, where) get values at least 1e-3 apart from one another and from 0
    return st.integers(int(lo * 100), int(hi * 100)).filter(lambda k: k != 0).map(lambda k: k / 100)


def property_cases():
    """(name, fn, [strategy per input]) for every built-in op: drawn shapes, drawn values."""
    from . import functional as F
    from .tensor import cat, where

    def shared(key, **kw):
        return st.shared(shapes(**kw), key=f"property.{key}")

    def side(key, lo=1, hi=4):
        return st.shared(st.integers(lo, hi), key=f"property.{key}")

    def dims(*parts):  # a shape strategy from ints and shared side strategies
        return st.tuples(*[st.just(p) if isinstance(p, int) else p for p in parts])

    positive = elements(0.1, 10.0)
    unique = _unique_elements()
    s = shared("x", max_dims=3, max_side=4)
    B, T, C, V, H = side("B", 1, 2), side("T"), side("C", 1, 5), side("V", 2, 5), side("NH", 1, 2)
    HS, TK = side("HS"), side("TK")
    half = side("half", 1, 3)
    cases = [
        ("add (broadcast)", lambda x, y: x + y, [arrays(s), arrays(broadcastable_shapes(s))]),
        ("sub (broadcast)", lambda x, y: x - y, [arrays(broadcastable_shapes(s)), arrays(s)]),
        ("mul (broadcast)", lambda x, y: x * y, [arrays(s), arrays(broadcastable_shapes(s))]),
        ("div", lambda x, y: x / y, [arrays(s), arrays(s, elements=positive)]),
        ("pow (tensor exponent)", lambda x, y: x ** y, [arrays(s, elements=positive), arrays(s, elements=elements(-3, 3))]),
        ("pow (scalar exponent)", lambda x: x ** 3, [arrays(s)]),
        ("neg", lambda x: -x, [arrays(s)]),
        ("matmul (batched)", lambda a, b: a @ b, [arrays(dims(B, T, C)), arrays(dims(C, V))]),
        ("matmul (vector)", lambda a, b: a @ b, [arrays(dims(C)), arrays(dims(B, C, V))]),
        ("exp", lambda x: x.exp(), [arrays(s, elements=elements(-5, 5))]),
        ("log", lambda x: x.log(), [arrays(s, elements=positive)]),
        ("sqrt", lambda x: x.sqrt(), [arrays(s, elements=positive)]),
        ("tanh", lambda x: x.tanh(), [arrays(s)]),
        ("sum (axis)", lambda x: x.sum(axis=-1), [arrays(s)]),
        ("mean (keepdims)", lambda x: x.mean(axis=0, keepdims=True), [arrays(s)]),
        ("max (axis)", lambda x: x.max(axis=-1), [hnp.arrays(np.float64, s, elements=unique, unique=True)]),
        ("reshape", lambda x: x.reshape(-1), [arrays(s)]),
        ("permute", lambda x: x.permute(tuple(reversed(range(x.ndim)))), [arrays(s)]),
        ("getitem (repeated ints)", lambda x: x[np.array([0, x.shape[0] - 1, 0])], [arrays(s)]),
        ("getitem (slice)", lambda x: x[..., ::2], [arrays(s)]),
        ("cat", lambda x, y: cat([x, y], axis=-1), [arrays(dims(B, T)), arrays(dims(B, C))]),
        ("split", lambda x: x.split([1, x.shape[-1] - 1], axis=-1)[1], [arrays(dims(B, side("split", 2, 5)))]),
        ("where", lambda x, y: where(x.data > 0, x, y), [arrays(s, elements=unique), arrays(broadcastable_shapes(s))]),
        ("linear", F.linear, [arrays(dims(B, T, C)), arrays(dims(C, V)), arrays(dims(V))]),
        ("embedding", lambda w, i: F.embedding(i, w), [arrays(dims(V, C)), token_ids(2, dims(B, T))]),
        ("layer_norm", F.layer_norm, [arrays(dims(B, T, C)), arrays(dims(C)), arrays(dims(C))]),
        ("rms_norm", lambda x, w: F.rms_norm(x, w, eps=1e-5), [arrays(dims(B, T, C)), arrays(dims(C))]),
        ("gelu (none, erf)", lambda x: F.gelu(x, approximate="none"), [arrays(s)]),
        ("gelu (tanh)", lambda x: F.gelu(x, approximate="tanh"), [arrays(s)]),
        ("silu", F.silu, [arrays(s)]),
        ("swiglu", F.swiglu, [arrays(s), arrays(broadcastable_shapes(s))]),
        ("softmax", lambda x: F.softmax(x, axis=-1), [arrays(s)]),
        ("log_softmax", F.log_softmax, [arrays(s)]),
        ("cross_entropy (ignore_index)", lambda x, t: F.cross_entropy(x, np.where(t.data == 0, -100, t.data - 1)),
         [arrays(dims(B, T, V)), token_ids(3, dims(B, T))]),
        ("cross_entropy (none)", lambda x, t: F.cross_entropy(x, t, reduction="none"),
         [arrays(dims(B, T, 2)), token_ids(2, dims(B, T))]),
        ("dropout", lambda x: F.dropout(x, 0.3, rng=np.random.default_rng(1)), [arrays(s)]),
        ("dropout_add", lambda x, y: F.dropout_add(x, y, 0.3, rng=np.random.default_rng(1)), [arrays(s), arrays(s)]),
        ("attention (causal)", F.scaled_dot_product_attention,
         [arrays(dims(B, H, T, HS), elements=elements(-3, 3)) for _ in range(3)]),
        ("attention (not causal, TQ != TK)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False),
         [arrays(dims(B, H, T, HS), elements=elements(-3, 3)), arrays(dims(B, H, TK, HS), elements=elements(-3, 3)),
          arrays(dims(B, H, TK, HS), elements=elements(-3, 3))]),
        ("self_attention (2 heads)", lambda x: F.self_attention(x, 2),
         [arrays(dims(B, T, st.shared(st.sampled_from([6, 12]), key="property.qkv")), elements=elements(-3, 3))]),
        ("rope", lambda x: F.rope(x, np.arange(3, 3 + x.shape[-2])), [arrays(dims(B, H, T, half.map(lambda n: 2 * n)))]),
        ("rope (interleaved)", lambda x: F.rope(x, np.arange(x.shape[-2]), interleaved=True),
         [arrays(dims(B, H, T, half.map(lambda n: 2 * n)))]),
    ]
    return cases


def property_table(op=None, examples=20, seed=0, out=None):
    """Check every built-in op (or those whose name contains `op`) on `examples` drawn inputs each.

    Prints one row per op (op, examples, worst relative error, result) and returns the number of
    failures, or None when no op matches. A failing op's report (the shrunk input) follows its row.
    """
    import sys

    out = out or sys.stdout
    cases = [c for c in property_cases() if op is None or op in c[0]]
    if not cases:
        return None
    print(f"{'op':34s} {'examples':>8s} {'worst rel err':>14s}  result", file=out)
    failures = 0
    for name, fn, strategies in cases:
        count = [0]
        try:
            worst = _check_shrunk(lambda *drawn, fn=fn, quick=False: _gradient_errors(fn, drawn, 1e-6, 1e-5, 1e-4,
                                                                                       quick=quick),
                                  strategies, examples, seed, name, counter=count)
            result, report = "ok", None
        except AssertionError as e:
            failures += 1
            worst, result, report = math.inf, "FAIL", str(e)
        print(f"{name:34s} {min(count[0], examples):8d} {worst:14.2e}  {result}", file=out)
        if report:
            print("  " + report.replace("\n", "\n  "), file=out)
    print(f"{len(cases) - failures} passed, {failures} failed", file=out)
    return failures
