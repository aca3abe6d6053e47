"""The autograd core: every primitive against PyTorch, and the invariants users rely on."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import check_op, torch

from tinygrad_llm.gradcheck import gradcheck
from tinygrad_llm.tensor import Tensor, cat, detect_anomaly, no_grad, where

DTYPES = ["float64", "float32"]


# ---- every primitive against torch -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [[(3, 4), (3, 4)], [(3, 4), (4,)], [(2, 3, 1), (1, 4)], [(4,), (2, 3, 4)], [(), (3,)]])
def test_binary_broadcasting(shapes, dtype):
    check_op(shapes, lambda x, y: x + y, lambda x, y: x + y, dtype=dtype)
    check_op(shapes, lambda x, y: x - y, lambda x, y: x - y, dtype=dtype)
    check_op(shapes, lambda x, y: x * y, lambda x, y: x * y, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_div(dtype):
    rng = np.random.default_rng(0)
    check_op([rng.standard_normal((3, 4)), rng.uniform(0.5, 2, (4,))], lambda x, y: x / y, lambda x, y: x / y, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_operands(dtype):
    check_op([(3, 4)], lambda x: 2 * x - 1 + x / 4 - 3 / (x * x + 1), lambda x: 2 * x - 1 + x / 4 - 3 / (x * x + 1), dtype=dtype)
    check_op([(3, 4)], lambda x: -x, lambda x: -x, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pow_tensor_exponent(dtype):
    rng = np.random.default_rng(1)
    check_op([rng.uniform(0.5, 2, (3, 4)), rng.standard_normal((4,))], lambda x, y: x ** y, lambda x, y: x ** y, dtype=dtype)


def test_pow_edge_cases_match_torch():
    # x = 0 with exponents 0, 1, 2, 2.5; a negative base with integer exponents
    x = np.array([0.0, 0.0, 0.0, 0.0, -2.0, -1.5, 3.0])
    y = np.array([0.0, 1.0, 2.0, 2.5, 3.0, 2.0, 0.0])
    check_op([x, y], lambda a, b: a ** b, lambda a, b: a ** b)
    check_op([np.array([0.0, -2.0, 1.5])], lambda a: a ** 3, lambda a: a ** 3)
    check_op([np.array([0.0, -2.0, 1.5])], lambda a: a ** 0, lambda a: a ** 0)
    check_op([np.array([0.0, 0.5, 2.0])], lambda a: 2.0 ** a, lambda a: 2.0 ** a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [[(3, 4), (4, 5)], [(2, 3, 4), (4, 5)], [(2, 1, 3, 4), (5, 4, 2)], [(4,), (4, 3)], [(2, 3, 4), (4,)], [(4,), (4,)]])
def test_matmul(shapes, dtype):
    check_op(shapes, lambda a, b: a @ b, lambda a, b: a @ b, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unary(dtype):
    rng = np.random.default_rng(2)
    positive = rng.uniform(0.3, 3, (3, 4))
    check_op([(3, 4)], torch.exp, lambda x: x.exp(), dtype=dtype)
    check_op([(3, 4)], torch.tanh, lambda x: x.tanh(), dtype=dtype)
    check_op([positive], torch.log, lambda x: x.log(), dtype=dtype)
    check_op([positive], torch.sqrt, lambda x: x.sqrt(), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (-1, True), ((0, 2), False), ((1, 2), True)])
def test_reductions(axis, keepdims, dtype):
    dim = axis if axis is not None else tuple(range(3))
    check_op([(2, 3, 4)], lambda x: x.sum(dim=dim, keepdim=keepdims), lambda x: x.sum(axis=axis, keepdims=keepdims), dtype=dtype)
    check_op([(2, 3, 4)], lambda x: x.mean(dim=dim, keepdim=keepdims), lambda x: x.mean(axis=axis, keepdims=keepdims), dtype=dtype)
    check_op([(2, 3, 4)], lambda x: x.amax(dim=dim, keepdim=keepdims), lambda x: x.max(axis=axis, keepdims=keepdims), dtype=dtype)


def test_max_ties_share_the_gradient_like_torch_amax():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    check_op([x], lambda t: t.amax(dim=1), lambda t: t.max(axis=1))
    check_op([x], lambda t: t.amax(), lambda t: t.max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_shape_ops(dtype):
    check_op([(2, 3, 4)], lambda x: x.reshape(4, 6), lambda x: x.reshape(4, 6), dtype=dtype)
    check_op([(2, 3, 4)], lambda x: x.permute(2, 0, 1), lambda x: x.permute(2, 0, 1), dtype=dtype)
    check_op([(2, 3, 4)], lambda x: x.transpose(0, 2), lambda x: x.transpose(0, 2), dtype=dtype)
    check_op([(3, 4)], lambda x: x.T, lambda x: x.T, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_getitem(dtype):
    check_op([(4, 5)], lambda x: x[1:3, ::2], lambda x: x[1:3, ::2], dtype=dtype)
    check_op([(4, 5)], lambda x: x[2], lambda x: x[2], dtype=dtype)
    check_op([(4, 5)], lambda x: x[..., -1], lambda x: x[..., -1], dtype=dtype)


def test_getitem_repeated_integer_indices_accumulate():
    idx = np.array([0, 2, 0, 0, 3])
    check_op([(4, 3)], lambda x: x[torch.tensor(idx)], lambda x: x[idx])
    rows, cols = np.array([1, 1, 2]), np.array([0, 0, 2])
    check_op([(4, 3)], lambda x: x[torch.tensor(rows), torch.tensor(cols)], lambda x: x[rows, cols])
    x = Tensor(np.zeros(3), requires_grad=True)
    x[np.array([1, 1, 1])].sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 3.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cat_split_where(dtype):
    check_op([(2, 3), (2, 2)], lambda a, b: torch.cat([a, b], 1), lambda a, b: cat([a, b], axis=1), dtype=dtype)
    check_op([(2, 5)], lambda x: x.split([2, 3], 1)[1] * 2, lambda x: x.split([2, 3], axis=1)[1] * 2, dtype=dtype)
    check_op([(5, 2)], lambda x: x.split(2)[2], lambda x: x.split(2)[2], dtype=dtype)
    cond = np.array([[True, False, True], [False, False, True]])
    check_op([(2, 3), (3,)], lambda a, b: torch.where(torch.tensor(cond), a, b), lambda a, b: where(cond, a, b), dtype=dtype)


def test_split_sizes_must_add_up():
    with pytest.raises(ValueError, match="do not add up"):
        Tensor(np.zeros((2, 5))).split([2, 2], axis=1)


# ---- hypothesis: broadcasting pairs through gradcheck ------------------------------------------

@st.composite
def broadcasting_pair(draw):
    ndim = draw(st.integers(1, 3))
    full = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
    a = [n if draw(st.booleans()) else 1 for n in full]
    b = [n if draw(st.booleans()) else 1 for n in full][draw(st.integers(0, ndim - 1)):]
    return tuple(a), tuple(b)


@given(broadcasting_pair(), st.sampled_from(["add", "sub", "mul", "div"]), st.integers(0, 2**16))
def test_broadcasting_gradients(pair, op, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(pair[0]), rng.uniform(0.5, 2, pair[1])
    fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y, "div": lambda x, y: x / y}[op]
    assert gradcheck(fn, [a, b]).passed


# ---- autograd invariants ---------------------------------------------------------------------

def test_a_10000_op_chain_backs_up_without_recursion_errors():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 10_000, rtol=1e-9)


def test_gradients_accumulate_across_two_backward_calls():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * x).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 3)


def test_second_backward_through_a_freed_graph_raises():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_retain_graph_allows_a_second_backward():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(x.grad, 4 * x.data)


def test_no_grad_builds_no_graph():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = (x * 2).sum()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_fan_out_sums_the_gradients():
    x = Tensor(np.array([2.0, -1.0]), requires_grad=True)
    y = x * 3
    (y * y + y + x).sum().backward()  # d/dx = 2*9x + 3 + 1
    np.testing.assert_allclose(x.grad, 18 * x.data + 4)


def test_detached_tensor_gets_no_gradient():
    x = Tensor(np.array([2.0]), requires_grad=True)
    (x * x.detach()).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0])


def test_detect_anomaly_names_the_forward_op():
    x = Tensor(np.array([0.0, 1.0]), requires_grad=True)
    with detect_anomaly(), np.errstate(divide="ignore"):
        with pytest.raises(FloatingPointError, match="Log forward"):
            x.log()


def test_detect_anomaly_names_the_backward_op():
    x = Tensor(np.array([0.0, 4.0]), requires_grad=True)
    with detect_anomaly(), np.errstate(divide="ignore"):
        y = x.sqrt()  # finite forward, but d sqrt(x) = 1 / (2 sqrt(x)) is inf at 0
        with pytest.raises(FloatingPointError, match="Sqrt backward"):
            y.sum().backward()


def test_non_scalar_backward_needs_a_gradient():
    y = Tensor(np.ones((2, 3)), requires_grad=True) * 2
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        y.backward(np.ones(3))


def test_integer_data_cannot_require_grad():
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(np.arange(3), requires_grad=True)


def test_dtypes_are_kept():
    for dtype in (np.float32, np.float64):
        x = Tensor(np.ones(3, dtype=dtype), requires_grad=True)
        y = (x * 2 + 1).sum()  # a full reduction returns a numpy scalar: it must keep its dtype
        assert y.dtype == dtype
        y.backward()
        assert x.grad.dtype == dtype


@pytest.mark.skip(reason="mixed devices need a GPU; on CPU every tensor is on the same device")
def test_mixed_devices_raise():
    pass


# ---- regressions found in review -------------------------------------------------------------------

def test_python_scalars_keep_integer_and_bool_tensors_honest():
    ints = Tensor(np.array([1, 2, 3]))
    np.testing.assert_array_equal((ints * 0.5).numpy(), [0.5, 1.0, 1.5])
    np.testing.assert_array_equal((Tensor(np.array([0, 1])) < 0.5).numpy(), [True, False])
    x32 = Tensor(np.ones(3, dtype=np.float32))
    assert (x32 * 0.5).dtype == np.float32  # a float tensor still sets a Python scalar's dtype


def test_a_failed_backward_leaves_every_grad_as_it_was():
    w = Tensor(np.ones(3), requires_grad=True)
    h = w * 2.0
    h.sum().backward()  # frees h's graph
    before = w.grad.copy()
    with pytest.raises(RuntimeError, match="second time"):
        (w.sum() + (h * 1.0).sum()).backward()
    np.testing.assert_array_equal(w.grad, before)


def test_max_backward_keeps_float32():
    x = Tensor(np.array([[1.0, 3.0, 3.0]], dtype=np.float32), requires_grad=True)
    out = x.max(axis=1)
    ctx_grad = out._ctx.backward_fn(out._ctx, np.ones(1, dtype=np.float32))
    assert ctx_grad.dtype == np.float32
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5]])


def test_to_on_a_tensor_inside_a_graph_raises_instead_of_cutting_it():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x * 2.0
    assert y.to("cpu") is y  # already there: nothing to move
    with pytest.raises(RuntimeError, match="would cut its gradient"):
        y.to("cuda")


# ---- writing your own op: Function is exported, and what its backward returns is checked ------

def test_function_is_exported_and_a_user_op_matches_torch():
    from tinygrad_llm import Function

    class Cube(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.x = x
            return x ** 3

        @staticmethod
        def backward(ctx, dout):
            return 3 * ctx.x ** 2 * dout   # d(x^3) = 3 x^2 dx

    x = np.random.default_rng(0).standard_normal((3, 4))
    t = Tensor(x, requires_grad=True)
    Cube.apply(t).sum().backward()
    tx = torch.tensor(x, requires_grad=True)
    (tx ** 3).sum().backward()
    np.testing.assert_allclose(t.grad, tx.grad.numpy(), rtol=1e-12)


def _op_with_backward(grads):
    from tinygrad_llm import Function

    class Scale(Function):
        @staticmethod
        def forward(ctx, x, y):
            return x * y

        @staticmethod
        def backward(ctx, dout):
            return grads(dout)

    return Scale


def test_backward_returning_too_few_gradients_names_the_op():
    op = _op_with_backward(lambda dout: dout)          # one gradient for two inputs
    x, y = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Scale backward returned 1 gradient\(s\) for its 2 input\(s\)"):
        op.apply(x, y).sum().backward()
    assert x.grad is None and y.grad is None            # nothing half-written
    too_many = _op_with_backward(lambda dout: (dout, dout, dout))
    with pytest.raises(RuntimeError, match=r"returned 3 gradient\(s\) for its 2 input\(s\)"):
        too_many.apply(x, y).sum().backward()


def test_backward_gradient_of_wrong_shape_names_op_input_and_both_shapes():
    op = _op_with_backward(lambda dout: (dout, dout.sum(keepdims=True)))
    x, y = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Scale backward gave a gradient of shape \(1,\) for input 1, which has shape \(3,\)"):
        op.apply(x, y).sum().backward()
    as_list = _op_with_backward(lambda dout: [dout, dout])                 # a list is taken as the tuple
    as_list.apply(x, y).sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(3))
    x.grad = y.grad = None
    not_array = _op_with_backward(lambda dout: (dout, 1.0))
    with pytest.raises(RuntimeError, match=r"Scale backward returned a float as the gradient of input 1 \(shape \(3,\)\)"):
        not_array.apply(x, y).sum().backward()


# ---- a backward that adds the gradient pending at its input itself (Function: sums_pending) -----------

def _summing_op(fold, offers, inputs=1, declare=True):
    """Scale: (x[, y]) -> 2 x (+ 3 y); with `declare`, sums_pending names every input. Its backward records what
    backward() offers it, and with `fold` returns each offered gradient added to its own (taking it), else its own."""
    from tinygrad_llm import Function

    class Scale(Function):
        sums_pending = tuple(range(inputs)) if declare else ()

        @staticmethod
        def forward(ctx, *xs):
            return 2 * xs[0] + (3 * xs[1] if inputs > 1 else 0)

        @staticmethod
        def backward(ctx, dout):
            pending = getattr(ctx, "pending", {})
            offers.append({i: a.copy() for i, a in pending.items()})
            grads = [2 * dout, 3 * dout][:inputs]          # d(2 x + 3 y) = 2 dx + 3 dy
            if fold:
                grads = [g + pending.pop(i) if i in pending else g for i, g in enumerate(grads)]
            return tuple(grads)

    return Scale


def _residual_grads(op, dout):
    """x.grad of (dout * (op(h) + h)).sum(), h = 1.5 x: the residual h's gradient is pending when op's backward runs."""
    x = Tensor(np.linspace(-1.0, 2.0, 12).reshape(3, 4), requires_grad=True)
    h = x * 1.5
    out = op.apply(h)
    (Tensor(dout) * (out + h)).sum().backward(retain_graph=True)
    return x.grad, out


def test_a_backward_is_offered_the_pending_gradient_and_its_sum_replaces_it():
    dout = np.random.default_rng(0).standard_normal((3, 4))
    offers = []
    grad, _ = _residual_grads(_summing_op(True, offers), dout)
    assert len(offers) == 1 and list(offers[0]) == [0]
    np.testing.assert_array_equal(offers[0][0], dout)          # the residual branch's gradient at h
    offers = []
    unfolded, _ = _residual_grads(_summing_op(True, offers, declare=False), dout)
    assert offers == [{}]                                       # undeclared: never offered, the engine adds
    np.testing.assert_array_equal(grad, unfolded)              # replaced, not added a second time
    np.testing.assert_allclose(grad, 1.5 * 3 * dout, rtol=1e-15)


def test_nothing_is_offered_without_a_pending_gradient_or_to_an_input_passed_twice():
    offers = []
    x = Tensor(np.ones(3), requires_grad=True)
    _summing_op(True, offers).apply(x).sum().backward()
    assert offers == [{}] and np.array_equal(x.grad, 2 * np.ones(3))
    offers, x.grad = [], None
    (_summing_op(True, offers, inputs=2).apply(x, x) + x).sum().backward()   # x at both inputs: never offered
    assert offers == [{}] and np.array_equal(x.grad, 6 * np.ones(3))
    offers, x.grad = [], None
    y = Tensor(np.ones(3), requires_grad=True)
    (_summing_op(True, offers, inputs=2).apply(x, y) + y).sum().backward()   # only y has one pending
    assert list(offers[0]) == [1] and np.array_equal(x.grad, 2 * np.ones(3)) and np.array_equal(y.grad, 4 * np.ones(3))


def test_a_backward_that_leaves_the_offer_gets_the_engines_add_and_no_hint_stays_on_ctx():
    dout = np.random.default_rng(1).standard_normal((3, 4))
    offers = []
    grad, out = _residual_grads(_summing_op(False, offers), dout)
    assert list(offers[0]) == [0]                               # offered, not taken: the engine adds it
    np.testing.assert_allclose(grad, 1.5 * 3 * dout, rtol=1e-15)
    assert not hasattr(out._ctx, "pending")                     # retain_graph kept ctx, not the offered array
    grad_folded, out = _residual_grads(_summing_op(True, []), dout)
    assert not hasattr(out._ctx, "pending")
    np.testing.assert_array_equal(grad, grad_folded)


@pytest.mark.parametrize("drops_offer", [False, True], ids=["keeps", "drops"])
def test_the_offer_is_withdrawn_when_the_backward_raises_and_its_error_stands(drops_offer):
    """A backward that raises, with the offer still on ctx or after deleting it itself: its own error surfaces, and
    no offered array stays on ctx."""
    from tinygrad_llm import Function

    class Fails(Function):
        sums_pending = (0,)

        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, dout):
            assert 0 in ctx.pending
            if drops_offer:
                del ctx.pending
            raise ValueError("backward failed")

    x = Tensor(np.ones(3), requires_grad=True)
    out = Fails.apply(x)
    with pytest.raises(ValueError, match="backward failed"):
        (out + x).sum().backward()
    assert not hasattr(out._ctx, "pending") and x.grad is None


def test_detect_anomaly_checks_the_sum_a_backward_returns():
    """Under detect_anomaly the engine checks each returned gradient; a folded one is the sum, so an overflow in
    the sum is reported naming the op that summed it."""
    offers = []
    x = Tensor(np.array([1e-3, 2e-3], dtype=np.float32), requires_grad=True)
    h = x * 1.0
    out = _summing_op(True, offers).apply(h)         # backward: 2 dout + the gradient pending at h
    loss = ((out + h) * np.float32(1.5e38)).sum()    # finite; h's gradient 2 (1.5e38) + 1.5e38 is not
    with detect_anomaly(), np.errstate(over="ignore"), pytest.raises(FloatingPointError, match="Scale backward"):
        loss.backward()
    assert list(offers[0]) == [0]
