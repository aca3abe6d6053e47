"""The op library three ways: against PyTorch (float64 and float32), fused == composite, and
finite-difference gradchecks over hypothesis-drawn shapes; then edge cases and bad input."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import check_op, torch

import tinygrad_llm.composite as C
import tinygrad_llm.functional as F
from tinygrad_llm import cases
from tinygrad_llm.gradcheck import gradcheck
from tinygrad_llm.tensor import Tensor

TF = torch.nn.functional
DTYPES = ["float64", "float32"]
rng0 = np.random.default_rng(1234)


_end_aligned_causal = cases._end_aligned_causal


def _torch_cross_entropy(logits, targets, **kw):
    return cases._torch_cross_entropy(torch, logits, targets, **kw)


TORCH_CASES = [case.name for case in cases.CASES if case.torch_fn is not None]
COMPOSITE_CASES = [case.name for case in cases.CASES if case.composite]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TORCH_CASES)
def test_against_torch(name, dtype):
    case = cases.BY_NAME[name]
    out = check_op(case.arrays(dtype), lambda *ts: case.torch_fn(torch, *ts), lambda *xs: case.fn(F, *xs), dtype=dtype)
    assert out.dtype == np.dtype(dtype), "ops compute in their input dtype"


@pytest.mark.parametrize("name", COMPOSITE_CASES)
def test_fused_equals_composite(name):
    case = cases.BY_NAME[name]
    arrays = case.arrays("float64", seed=7)
    dout, results = None, []
    for module in (F, C):
        tensors = [Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
        out = case.fn(module, *tensors)
        dout = np.random.default_rng(8).standard_normal(out.shape) if dout is None else dout
        (out * Tensor(dout)).sum().backward()
        results.append([out.numpy()] + [t.grad for t in tensors if t.requires_grad])
    for fused, composite in zip(*results):
        np.testing.assert_allclose(fused, composite, rtol=1e-10, atol=1e-12)


def test_dropout_fused_equals_composite():
    x = rng0.standard_normal((4, 6))
    fused = F.dropout(Tensor(x), 0.3, rng=np.random.default_rng(3))
    composite = C.dropout(Tensor(x), 0.3, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(fused.numpy(), composite.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_against_torch_with_the_same_mask(dtype):
    p = 0.25
    keep = np.random.default_rng(5).random((3, 7), dtype=np.float32) >= p
    check_op([(3, 7)], lambda x: x * torch.tensor(keep) / (1 - p), lambda x: F.dropout(x, p, rng=np.random.default_rng(5)), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_add_against_torch_with_the_same_mask(dtype):
    p = 0.25
    keep = np.random.default_rng(5).random((4, 3, 7), dtype=np.float32) >= p
    check_op([(4, 3, 7), (4, 3, 7)], lambda x, y: x + y * torch.tensor(keep) / (1 - p),
             lambda x, y: F.dropout_add(x, y, p, rng=np.random.default_rng(5)), dtype=dtype)


@pytest.mark.parametrize("p", [0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_add_is_add_of_dropout_bit_for_bit(dtype, p):
    """The same generator state gives the same mask: output and both gradients equal x + dropout(y)'s exactly,
    and the generator is left where dropout leaves it (one draw of y's shape)."""
    rng = np.random.default_rng(21)
    x, y = rng.standard_normal((2, 5, 33)).astype(dtype), rng.standard_normal((2, 5, 33)).astype(dtype)
    dout = Tensor(rng.standard_normal((2, 5, 33)).astype(dtype))
    results = []
    for fused in (True, False):
        gen = np.random.default_rng(9)
        tx, ty = Tensor(x, requires_grad=True), Tensor(y, requires_grad=True)
        out = F.dropout_add(tx, ty, p, rng=gen) if fused else tx + F.dropout(ty, p, rng=gen)
        (out * dout).sum().backward()
        results.append((out.numpy(), tx.grad, ty.grad, gen.random()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    out, dx, dy, _ = results[0]
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(dx, dout.numpy())
    dropped = dy == 0
    np.testing.assert_array_equal(out[dropped], x[dropped])          # a dropped element leaves x as it was
    assert dropped.all() if p == 1 else 0.15 < dropped.mean() < 0.45


# ---- attention dropout ---------------------------------------------------------------------------

def _attention_inputs(seed, shape=(2, 3, 6, 4), dtype="float64"):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_attention_dropout_fused_equals_composite_with_the_same_generator_seed(causal):
    arrays = _attention_inputs(11)
    dout = np.random.default_rng(12).standard_normal(arrays[0].shape)
    results = []
    for module in (F, C):
        tensors = [Tensor(a, requires_grad=True) for a in arrays]
        out = module.scaled_dot_product_attention(*tensors, causal=causal, dropout_p=0.3, rng=np.random.default_rng(5))
        (out * Tensor(dout)).sum().backward()
        results.append([out.numpy()] + [t.grad for t in tensors])
    for fused, composite in zip(*results):
        np.testing.assert_allclose(fused, composite, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_dropout_against_torch_with_the_same_mask(dtype):
    """torch's own dropout_p draws from torch's generator; the oracle here is its math with our mask."""
    p, shape = 0.25, (2, 2, 5, 4)
    keep = np.random.default_rng(6).random(shape[:-1] + (shape[-2],), dtype=np.float32) >= p
    def torch_fn(q, k, v):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(shape[-1])
        s = s.masked_fill(~torch.tensor(_end_aligned_causal(5, 5)), -math.inf)
        return (torch.softmax(s, -1) * torch.tensor(keep) / (1 - p)) @ v
    check_op([shape] * 3, torch_fn,
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=p, rng=np.random.default_rng(6)), dtype=dtype)


def test_attention_dropout_p_zero_is_exactly_the_op_without_dropout():
    arrays = _attention_inputs(13, dtype="float32")
    results = []
    for kwargs in ({}, {"dropout_p": 0.0}, {"dropout_p": 0.0, "rng": np.random.default_rng(0)}):
        tensors = [Tensor(a, requires_grad=True) for a in arrays]
        out = F.scaled_dot_product_attention(*tensors, **kwargs)
        out.sum().backward()
        results.append([out.numpy()] + [t.grad for t in tensors])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_attention_dropout_mask_statistics_and_errors():
    from tinygrad_llm.tensor import Context
    p, (q, k, v) = 0.2, _attention_inputs(14, shape=(4, 4, 64, 8))
    ctx = Context((True, True, True, False))
    out = F.ScaledDotProductAttention.forward(ctx, q, k, v, None, causal=True, scale=0.35, dropout_p=p,
                                              rng=np.random.default_rng(0))
    mask = ctx.drop
    assert set(np.unique(mask)) == {0.0, 1 / (1 - p)}
    assert abs((mask == 0).mean() - p) < 0.01          # 65536 draws: 4 standard deviations is 0.006
    np.testing.assert_allclose(out, (ctx.p * mask) @ v, rtol=1e-12)
    # inverted scaling: averaged over many masks, the output is the output without dropout
    plain = F.scaled_dot_product_attention(Tensor(q[:1, :1]), Tensor(k[:1, :1]), Tensor(v[:1, :1])).numpy()
    gen = np.random.default_rng(1)
    mean = np.mean([F.scaled_dot_product_attention(Tensor(q[:1, :1]), Tensor(k[:1, :1]), Tensor(v[:1, :1]),
                                                   dropout_p=p, rng=gen).numpy() for _ in range(2000)], axis=0)
    np.testing.assert_allclose(mean, plain, atol=0.05)
    # different generator states give different masks; p = 1 gives zeros
    a = F.scaled_dot_product_attention(*map(Tensor, (q, k, v)), dropout_p=p, rng=np.random.default_rng(1)).numpy()
    b = F.scaled_dot_product_attention(*map(Tensor, (q, k, v)), dropout_p=p, rng=np.random.default_rng(2)).numpy()
    assert not np.array_equal(a, b)
    assert not F.scaled_dot_product_attention(*map(Tensor, (q, k, v)), dropout_p=1.0, rng=np.random.default_rng(0)).numpy().any()
    with pytest.raises(ValueError, match="rng"):
        F.scaled_dot_product_attention(*map(Tensor, (q, k, v)), dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        F.scaled_dot_product_attention(*map(Tensor, (q, k, v)), dropout_p=1.5, rng=np.random.default_rng(0))


def test_attention_dropout_on_the_numba_kernel_path_uses_the_reference():
    """Shapes the Numba kernel serves (T*T >= 128*128) fall back to the reference when dropout_p > 0."""
    arrays = _attention_inputs(15, shape=(1, 2, 128, 8), dtype="float32")
    outs = []
    for module in (F, C):
        outs.append(module.scaled_dot_product_attention(*map(Tensor, arrays), dropout_p=0.2,
                                                        rng=np.random.default_rng(3)).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


# ---- hypothesis: gradchecks over random shapes -----------------------------------------------

seeds = st.integers(0, 2**16)
small = st.integers(1, 4)


@given(st.lists(small, min_size=1, max_size=3), seeds, st.booleans(), st.booleans())
def test_gradcheck_layer_norm_and_rms_norm(shape, seed, affine, zero_variance_row):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if zero_variance_row:
        x.reshape(-1, shape[-1])[0] = 0.7  # a constant row: variance 0 (layer_norm) / all equal (rms_norm)
    w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    if affine:
        assert gradcheck(F.layer_norm, [x, w, b], atol=1e-5).passed
        assert gradcheck(F.rms_norm, [x, w], atol=1e-5).passed
    else:
        assert gradcheck(F.layer_norm, [x + 0.1 * rng.standard_normal(shape)], atol=1e-5).passed
        assert gradcheck(F.rms_norm, [x], atol=1e-5).passed


@given(st.lists(small, min_size=1, max_size=3), seeds, st.sampled_from([1.0, 30.0]))
def test_gradcheck_softmax_and_log_softmax(shape, seed, spread):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * spread
    axis = int(rng.integers(-len(shape), len(shape)))
    assert gradcheck(lambda t: F.softmax(t, axis=axis), [x]).passed
    assert gradcheck(lambda t: F.log_softmax(t, axis=axis), [x]).passed


@given(st.lists(small, min_size=0, max_size=2), st.integers(2, 6), seeds, st.sampled_from(["mean", "sum", "none"]),
       st.floats(0.0, 1.0))
def test_gradcheck_cross_entropy(lead, V, seed, reduction, ignored_fraction):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(tuple(lead) + (V,)) * 3
    targets = rng.integers(0, V, size=tuple(lead))
    targets = np.where(rng.random(targets.shape) < ignored_fraction, -100, targets)
    assert gradcheck(lambda x: F.cross_entropy(x, targets, reduction=reduction), [logits]).passed


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(0, 3), st.integers(1, 4), seeds,
       st.booleans(), st.booleans())
def test_gradcheck_attention(B, NH, TQ, extra_keys, HS, seed, causal, use_mask):
    rng = np.random.default_rng(seed)
    TK = TQ + extra_keys
    q, k, v = rng.standard_normal((B, NH, TQ, HS)), rng.standard_normal((B, NH, TK, HS)), rng.standard_normal((B, NH, TK, HS))
    mask = rng.random((B, 1, TQ, TK)) > 0.3 if use_mask else None  # rows with no allowed key included
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, mask=mask)  # noqa: E731
    assert gradcheck(fn, [q, k, v]).passed


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), seeds, st.booleans())
def test_gradcheck_self_attention(B, NH, T, HS, seed, causal):
    qkv = np.random.default_rng(seed).standard_normal((B, T, 3 * NH * HS))
    assert gradcheck(lambda x: F.self_attention(x, NH, causal=causal), [qkv]).passed


def test_self_attention_with_dropout_equals_the_split_heads_path():
    """The packed op draws the same mask from the same generator as split + scaled_dot_product_attention."""
    for dtype, tol in (("float64", dict(rtol=1e-12, atol=1e-13)), ("float32", dict(rtol=1e-5, atol=1e-6))):
        qkv = np.random.default_rng(21).standard_normal((2, 7, 18)).astype(dtype)
        dout = np.random.default_rng(22).standard_normal((2, 7, 6)).astype(dtype)
        results = []
        for module in (F, C):
            x = Tensor(qkv, requires_grad=True)
            out = module.self_attention(x, 3, dropout_p=0.25, rng=np.random.default_rng(23))
            (out * Tensor(dout)).sum().backward()
            results.append((out.numpy(), x.grad))
        for fused, composite in zip(*results):
            np.testing.assert_allclose(fused, composite, **tol)


def test_self_attention_bad_input():
    with pytest.raises(ValueError, match=r"qkv has shape \(2, 3, 10\); expected \(B, T, 3C\) with C divisible by n_head=2"):
        F.self_attention(t(2, 3, 10), 2)
    with pytest.raises(ValueError, match=r"qkv has shape \(3, 12\)"):
        F.self_attention(t(3, 12), 2)
    with pytest.raises(ValueError, match="n_head must be a positive integer, got 0"):
        F.self_attention(t(2, 3, 12), 0)
    with pytest.raises(ValueError, match="dropout_p > 0 needs rng"):
        F.self_attention(t(2, 3, 12), 2, dropout_p=0.1)
    with pytest.raises(TypeError, match="self_attention"):
        F.self_attention(Tensor(np.zeros((2, 3, 12), dtype=np.int64)), 2)


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), seeds, st.booleans())
def test_gradcheck_rope(NH, T, half, seed, interleaved):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, NH, T, 2 * half))
    pos = rng.integers(0, 100, size=T)
    assert gradcheck(lambda t: F.rope(t, pos, interleaved=interleaved), [x]).passed


@given(st.lists(small, min_size=1, max_size=3), seeds)
def test_gradcheck_activations(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3
    for fn in (lambda t: F.gelu(t), lambda t: F.gelu(t, approximate="tanh"), F.silu):
        assert gradcheck(fn, [x]).passed
    up_shape = tuple(n if rng.random() < 0.5 else 1 for n in shape)  # a broadcasting pair
    assert gradcheck(F.swiglu, [x, rng.standard_normal(up_shape)]).passed


@given(st.integers(1, 5), st.integers(1, 3), st.lists(st.integers(0, 4), min_size=1, max_size=6), seeds)
def test_gradcheck_embedding_and_linear(V, C_, ids, seed):
    rng = np.random.default_rng(seed)
    ids = np.array(ids) % V
    assert gradcheck(lambda w: F.embedding(ids, w), [rng.standard_normal((V, C_))]).passed
    assert gradcheck(F.linear, [rng.standard_normal((len(ids), V)), rng.standard_normal((V, C_)), rng.standard_normal(C_)]).passed


# ---- numerical edge cases ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_are_stable(dtype):
    logits = rng0.standard_normal((5, 7)) * 1e4
    targets = np.array([0, 6, -100, 3, 3])
    check_op([logits, targets], _torch_cross_entropy, F.cross_entropy, dtype=dtype, rtol=1e-6 if dtype == "float64" else 1e-4)
    check_op([logits], lambda x: TF.log_softmax(x, -1), F.log_softmax, dtype=dtype, rtol=1e-6 if dtype == "float64" else 1e-4)
    check_op([logits], lambda x: TF.softmax(x, -1), F.softmax, dtype=dtype)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradient():
    logits = Tensor(rng0.standard_normal((3, 4)), requires_grad=True)
    loss = F.cross_entropy(logits, np.full(3, -100))
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    np.testing.assert_array_equal(logits.grad, 0.0)


def test_cross_entropy_none_is_zero_at_ignored_targets():
    out = F.cross_entropy(Tensor(rng0.standard_normal((2, 3, 4))), np.array([[1, -100, 0], [-100, 3, 3]]), reduction="none")
    assert out.shape == (2, 3) and out.numpy()[0, 1] == 0 and out.numpy()[1, 0] == 0


def test_attention_row_with_no_allowed_key_gives_zeros_and_zero_gradient():
    q, k, v = (Tensor(rng0.standard_normal((1, 1, 3, 4)), requires_grad=True) for _ in range(3))
    mask = np.array([[True, True, False], [False, False, False], [True, False, True]])
    out = F.scaled_dot_product_attention(q, k, v, causal=False, mask=mask)
    np.testing.assert_array_equal(out.numpy()[0, 0, 1], 0.0)
    (out * out).sum().backward()
    np.testing.assert_array_equal(q.grad[0, 0, 1], 0.0)
    assert np.isfinite(k.grad).all() and np.isfinite(v.grad).all()


def test_causal_query_block_aligns_to_the_end_of_the_keys():
    """The last TQ rows of full causal attention == attention of those TQ queries over all keys (KV cache)."""
    q, k, v = (Tensor(rng0.standard_normal((2, 2, 6, 4))) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v).numpy()
    tail = F.scaled_dot_product_attention(q[:, :, 4:], k, v).numpy()
    np.testing.assert_allclose(tail, full[:, :, 4:], rtol=1e-12)


def test_layer_norm_zero_variance_row_is_finite():
    x = Tensor(np.full((2, 5), 3.0), requires_grad=True)
    out = F.layer_norm(x, Tensor(np.ones(5)), Tensor(np.zeros(5)))
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.sum().backward()
    assert np.isfinite(x.grad).all()


def test_rope_attention_scores_depend_only_on_relative_position():
    q, k = rng0.standard_normal((1, 1, 1, 8)), rng0.standard_normal((1, 1, 1, 8))
    for interleaved in (False, True):
        scores = []
        for offset in (0, 17, 1000):
            rq = F.rope(Tensor(q), np.array([offset + 5]), interleaved=interleaved).numpy()
            rk = F.rope(Tensor(k), np.array([offset + 2]), interleaved=interleaved).numpy()
            scores.append(float((rq * rk).sum()))
        np.testing.assert_allclose(scores, scores[0], rtol=1e-10)


def test_erf_matches_math_erf_to_float64_precision():
    x = np.concatenate([np.linspace(-8, 8, 160_001), np.geomspace(1e-300, 30, 2000), -np.geomspace(1e-300, 30, 2000),
                        [0.0, 2.5, -2.5, np.nextafter(2.5, 0), 5e-324, 1e300, np.inf, -np.inf]])
    expected = np.array([math.erf(v) for v in x])
    got = F._erf(x)
    np.testing.assert_array_less(np.abs(got - expected), 1e-14 * np.abs(expected) + 1e-320)
    assert np.isnan(F._erf(np.array([np.nan]))[0])


def test_gelu_tail_is_accurate():
    x = np.array([-38.0, -20.0, -10.0, -5.0, -3.6, 8.0])
    expected = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    np.testing.assert_allclose(F.gelu(Tensor(x)).numpy(), expected, rtol=1e-12, atol=0)


# ---- dropout semantics ------------------------------------------------------------------------

def test_dropout_identity_cases_return_the_same_tensor():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, rng=None) is x


def test_dropout_p_one_gives_zeros_and_p_outside_raises():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    out = F.dropout(x, 1.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, 0.0)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            F.dropout(x, p, rng=np.random.default_rng(0))


def test_dropout_add_in_eval_or_at_p_zero_is_the_plain_add():
    x, y = Tensor(rng0.standard_normal((3, 4)), requires_grad=True), Tensor(rng0.standard_normal((3, 4)), requires_grad=True)
    gen = np.random.default_rng(0)
    state = gen.bit_generator.state
    for out in (F.dropout_add(x, y, 0.5, training=False, rng=gen), F.dropout_add(x, y, 0.0)):
        assert out._ctx.op_name == "Add"
        np.testing.assert_array_equal(out.numpy(), (x + y).numpy())
    assert gen.bit_generator.state == state


def test_dropout_add_rejects_bad_input_before_drawing():
    gen = np.random.default_rng(0)
    state = gen.bit_generator.state
    x = Tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"x has shape \(2, 3\), y has shape \(3, 2\)"):
        F.dropout_add(x, Tensor(np.ones((3, 2))), 0.1, rng=gen)
    with pytest.raises(ValueError, match=r"x has shape \(2, 3\), y has shape \(3,\)"):
        F.dropout_add(x, Tensor(np.ones(3)), 0.1, training=False)   # no broadcasting, in eval either
    with pytest.raises(ValueError, match="x has dtype float64, y has dtype float32"):
        F.dropout_add(x, Tensor(np.ones((2, 3), np.float32)), 0.1, rng=gen)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout_add: p must be in"):
            F.dropout_add(x, x, p, rng=gen)
    with pytest.raises(ValueError, match="Generator"):
        F.dropout_add(x, x, 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        F.dropout_add(Tensor(np.ones((2, 3), np.int64)), Tensor(np.ones((2, 3), np.int64)), 0.1, rng=gen)
    assert gen.bit_generator.state == state


def test_dropout_needs_a_generator_and_is_deterministic_per_seed():
    x = Tensor(np.ones((50, 40)), requires_grad=True)
    with pytest.raises(ValueError, match="Generator"):
        F.dropout(x, 0.1)
    a = F.dropout(x, 0.2, rng=np.random.default_rng(9))
    b = F.dropout(x, 0.2, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    kept = a.numpy() != 0
    np.testing.assert_allclose(a.numpy()[kept], 1 / 0.8)
    assert abs(kept.mean() - 0.8) < 0.03
    a.sum().backward()  # backward reuses the forward's mask
    np.testing.assert_array_equal(x.grad, a.numpy())


# ---- bad input --------------------------------------------------------------------------------

def t(*shape, dtype=np.float64):
    return Tensor(np.zeros(shape, dtype=dtype))


def test_mismatched_shapes_name_both_shapes():
    with pytest.raises(ValueError, match=r"x has last axis 7 but w has shape \(8,\)"):
        F.layer_norm(t(2, 7), t(8), t(8))
    with pytest.raises(ValueError, match=r"x has last axis 7 but w has shape \(8,\)"):
        F.rms_norm(t(2, 7), t(8))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(5, 6\)"):
        F.linear(t(2, 3, 4), t(5, 6))
    with pytest.raises(ValueError, match=r"logits have shape \(4, 5\) and targets have shape \(3,\)"):
        F.cross_entropy(t(4, 5), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"q has shape \(1, 2, 3, 4\), k has shape \(1, 2, 3, 5\)"):
        F.scaled_dot_product_attention(t(1, 2, 3, 4), t(1, 2, 3, 5), t(1, 2, 3, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2\)"):
        F.scaled_dot_product_attention(t(1, 1, 3, 4), t(1, 1, 3, 4), t(1, 1, 3, 4), mask=np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match=r"gate has shape \(2, 3\) and up has shape \(2, 4\)"):
        F.swiglu(t(2, 3), t(2, 4))
    with pytest.raises(ValueError, match=r"pos has shape \(4,\) but x has shape \(1, 1, 3, 4\)"):
        F.rope(t(1, 1, 3, 4), np.arange(4))
    with pytest.raises(ValueError, match="HS even"):
        F.rope(t(1, 1, 3, 5), np.arange(3))


def test_out_of_range_ids_and_targets_raise_index_error():
    with pytest.raises(IndexError, match=r"token id 5 .*\[0, 5\)"):
        F.embedding(np.array([[0, 5]]), t(5, 3))
    with pytest.raises(IndexError, match=r"token id -1"):
        F.embedding(np.array([-1, 0]), t(5, 3))
    with pytest.raises(IndexError, match=r"target 9 is outside \[0, 4\)"):
        F.cross_entropy(t(2, 4), np.array([1, 9]))
    with pytest.raises(IndexError, match=r"target -3"):
        F.cross_entropy(t(2, 4), np.array([-3, -100]))


def test_integer_data_where_floats_are_needed():
    ints = Tensor(np.arange(6).reshape(2, 3))
    for call in (lambda: F.layer_norm(ints), lambda: F.softmax(ints), lambda: F.gelu(ints), lambda: F.linear(ints, t(3, 2)),
                 lambda: F.cross_entropy(ints, np.zeros(2, dtype=np.int64))):
        with pytest.raises(TypeError, match="floating-point"):
            call()
    with pytest.raises(TypeError, match="must hold integers"):
        F.embedding(np.array([0.0, 1.0]), t(3, 2))
    with pytest.raises(TypeError, match="must hold integers"):
        F.cross_entropy(t(2, 3), np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="boolean"):
        F.scaled_dot_product_attention(t(1, 1, 2, 2), t(1, 1, 2, 2), t(1, 1, 2, 2), mask=np.ones((2, 2)))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(t(3), approximate="fast")
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(t(2, 3), np.zeros(2, dtype=np.int64), reduction="avg")
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        F.softmax(t(2, 3), axis=3)


def test_integer_indices_may_be_tensors():
    w = Tensor(rng0.standard_normal((5, 2)))
    np.testing.assert_array_equal(F.embedding(Tensor(np.array([1, 4])), w).numpy(), w.numpy()[[1, 4]])
    loss = F.cross_entropy(Tensor(rng0.standard_normal((2, 5))), Tensor(np.array([1, 4])))
    assert np.isfinite(loss.item())
    np.testing.assert_array_equal(F.embedding([[1, 4]], w).numpy(), w.numpy()[[[1, 4]]])
    assert F.rope(Tensor(rng0.standard_normal((1, 1, 2, 4))), [3, 4]).shape == (1, 1, 2, 4)
