"""The CuPy backend: every op and the whole model on the GPU equal the CPU path; the CuPy kernels equal
their references; a training step, checkpoints and sampling work across devices.

Skipped (cleanly, at collection) where CuPy or a GPU is missing. Tolerances: float64 to rounding (1e-10
relative), float32 loose (2e-4 for an op, 1e-3 for the whole model: cuBLAS and NumPy sum in other orders).
"""
import numpy as np
import pytest

from tinygrad_llm import backend, cases
from tinygrad_llm import functional as F
from tinygrad_llm.checkpoint import load_checkpoint, save_checkpoint
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW, adamw_update, clip_grad_norm, param_groups
from tinygrad_llm.sample import generate
from tinygrad_llm.tensor import Add, Context, Tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")]

TOL = {np.float64: 1e-10, np.float32: 2e-4}


def rel_err(a, b):
    a, b = np.asarray(backend.to_device(a, "cpu"), np.float64), np.asarray(backend.to_device(b, "cpu"), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.size else 0.0


def run(fn, arrays, device, seed=0):
    """fn(*tensors) on `device`; returns the output and the gradient of (out * dout).sum() for each float input."""
    tensors = [Tensor(backend.to_device(a, device), requires_grad=a.dtype.kind == "f") for a in arrays]
    out = fn(*tensors)
    dout = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    (out * Tensor(backend.to_device(dout, device))).sum().backward()
    return out.numpy(), [t.grad for t in tensors if t.requires_grad]


def assert_same_on_both(fn, arrays, dtype):
    out_cpu, grads_cpu = run(fn, arrays, "cpu")
    out_gpu, grads_gpu = run(fn, arrays, "cuda")
    assert rel_err(out_gpu, out_cpu) < TOL[dtype]
    for g_gpu, g_cpu in zip(grads_gpu, grads_cpu):
        assert backend.device_of(g_gpu) == "cuda"
        assert rel_err(g_gpu, g_cpu) < TOL[dtype]


def randn(rng, *shape, dtype=np.float64, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- every op: GPU == CPU --------------------------------------------------------------------------

GPU_CASES = [case.name for case in cases.CASES if case.devices_agree]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", GPU_CASES)
def test_op_on_gpu_equals_cpu(name, dtype):
    case = cases.BY_NAME[name]
    assert_same_on_both(lambda *xs: case.fn(F, *xs), case.arrays(dtype), dtype)


def test_mixed_devices_raise_naming_both():
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    y = x.to("cuda")
    assert y.device == "cuda" and y.requires_grad and x.device == "cpu"
    with pytest.raises(RuntimeError, match=r"different devices.*cpu.*cuda"):
        x + y
    with pytest.raises(RuntimeError, match="cuda.*cpu"):
        F.linear(y, Tensor(np.ones((3, 4), np.float32)))


def test_to_moves_and_back():
    x = Tensor(np.arange(6.0).reshape(2, 3))
    y = x.to("cuda")
    assert backend.is_cupy_array(y.data) and y.to("cuda") is y
    np.testing.assert_array_equal(y.to("cpu").data, x.data)
    np.testing.assert_array_equal(y.numpy(), x.data)
    with pytest.raises(ValueError, match="unknown device"):
        x.to("tpu")


# ---- the CuPy kernels equal their references (both run on the GPU) -------------------------------

def kernels():
    """The CuPy kernel modules, by op family (importing them needs CuPy)."""
    import importlib
    import types
    names = ("attention", "cross_entropy", "cublas", "elementwise", "gemm_3xtf32", "grads", "layer_norm", "linear",
             "optim")
    return types.SimpleNamespace(**{n: importlib.import_module(f"tinygrad_llm.kernels.cuda.{n}") for n in names})


def compare_kernel(reference, kernel, arrays, attrs, dtype, seed=0):
    import cupy as cp
    arrays = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in arrays]
    needs = tuple(a is not None and hasattr(a, "dtype") and a.dtype.kind == "f" for a in arrays)
    ctx_ref, ctx_ker = Context(needs), Context(needs)
    out_ref = reference.forward(ctx_ref, *arrays, **attrs)
    out_ker = kernel.forward(ctx_ker, *arrays, **attrs)
    assert out_ker.dtype == out_ref.dtype and backend.device_of(out_ker) == "cuda"
    assert rel_err(out_ker, out_ref) < TOL[dtype]
    dout = cp.asarray(np.random.default_rng(seed).standard_normal(out_ref.shape).astype(dtype))
    for g_ref, g_ker in zip(reference.backward(ctx_ref, dout), kernel.backward(ctx_ker, dout)):
        assert (g_ref is None) == (g_ker is None)
        if g_ref is not None:
            assert g_ker.dtype == g_ref.dtype
            assert rel_err(g_ker, g_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 64, 32), (2, 1, 33, 5)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_kernel_equals_reference(shape, causal, dtype):
    rng = np.random.default_rng(1)
    q, k, v = (randn(rng, *shape, dtype=dtype) for _ in range(3))
    compare_kernel(F.ScaledDotProductAttention, kernels().attention.ScaledDotProductAttentionCuda, [q, k, v, None],
                   dict(causal=causal, scale=1 / np.sqrt(shape[-1])), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_attention_kernel_short_queries_and_mask_fallback(dtype):
    rng = np.random.default_rng(2)
    q, k, v = randn(rng, 2, 2, 3, 8, dtype=dtype), randn(rng, 2, 2, 9, 8, dtype=dtype), randn(rng, 2, 2, 9, 8, dtype=dtype)
    compare_kernel(F.ScaledDotProductAttention, kernels().attention.ScaledDotProductAttentionCuda, [q, k, v, None], dict(causal=True, scale=0.3), dtype)
    mask = np.random.default_rng(3).random((2, 2, 3, 9)) < 0.5
    import cupy as cp
    compare_kernel(F.ScaledDotProductAttention, kernels().attention.ScaledDotProductAttentionCuda, [q, k, v, cp.asarray(mask)],
                   dict(causal=False, scale=0.3), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("N,C", [(1, 3), (37, 10), (300, 384), (5, 1000)])
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm_kernel_equals_reference(N, C, affine, dtype):
    rng = np.random.default_rng(4)
    x = randn(rng, N, C, dtype=dtype, scale=3) + 2
    w = randn(rng, C, dtype=dtype) if affine != "none" else None
    b = randn(rng, C, dtype=dtype) if affine == "wb" else None
    compare_kernel(F.LayerNorm, kernels().layer_norm.LayerNormCuda, [x, w, b], dict(eps=1e-5), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("N,C", [(64 * 256, 384), (4099, 65), (3, 1024)])
def test_layer_norm_backward_at_model_size_equals_float64(N, C, dtype):
    """The register-row backward over many rows a warp and many blocks' partials: dx, dw, db against the
    float64 op on the same input (float32: 1e-4 of the largest, as the sums run over 16384 rows), and
    the x-not-needed launch gives the same dw, db."""
    import cupy as cp
    rng = np.random.default_rng(N + C)
    x = randn(rng, N, C, dtype=dtype, scale=2) + 1
    w, b, dout = randn(rng, C, dtype=dtype), randn(rng, C, dtype=dtype), randn(rng, N, C, dtype=dtype)
    ctx_ref, ctx = Context((True,) * 3), Context((True,) * 3)
    F.LayerNorm.forward(ctx_ref, cp.asarray(x, np.float64), cp.asarray(w, np.float64), cp.asarray(b, np.float64))
    ref = F.LayerNorm.backward(ctx_ref, cp.asarray(dout, np.float64))
    LN = kernels().layer_norm.LayerNormCuda
    LN.forward(ctx, cp.asarray(x), cp.asarray(w), cp.asarray(b))
    assert not ctx.reference
    got = LN.backward(ctx, cp.asarray(dout))
    tol = 1e-10 if dtype == np.float64 else 1e-4
    for g, r in zip(got, ref):
        assert g.dtype == dtype and rel_err(g, r) < tol
    ctx.needs_input_grad = (False, True, True)
    dx, dw, db = LN.backward(ctx, cp.asarray(dout))
    assert dx is None and rel_err(dw, got[1]) == 0 and rel_err(db, got[2]) == 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("N,C", [(37, 10), (4099, 65), (300, 384), (3, 1024)])
def test_layer_norm_backward_adds_the_pending_gradient_bit_for_bit(N, C, dtype):
    """Offered the gradient pending at x (ctx.pending, tensor.Function's sums_pending), the kernel takes it and
    writes dx + pending: the bits of its own dx added by the autograd's Add (the GPU's vector add), whatever
    the pending array's layout; dw, db unchanged. Not taken: another dtype or shape, dx not wanted."""
    import cupy as cp
    rng = np.random.default_rng(N * 3 + C)
    x, dout, pending = (cp.asarray(randn(rng, N, C, dtype=dtype, scale=2) + 1) for _ in range(3))
    w, b = cp.asarray(randn(rng, C, dtype=dtype)), cp.asarray(randn(rng, C, dtype=dtype))
    LN = kernels().layer_norm.LayerNormCuda
    assert LN.sums_pending == (0,)
    ctx = Context((True,) * 3)
    LN.forward(ctx, x, w, b)
    dx, dw, db = LN.backward(ctx, dout)
    want = backend.accelerated(Add, pending, dx).forward(Context((False, False)), pending, dx)  # what the autograd adds
    for offered in (pending, cp.asfortranarray(pending)):
        ctx.pending = {0: offered}
        got = LN.backward(ctx, dout)
        assert ctx.pending == {}                        # taken
        assert bool((got[0] == want).all()) and bool((got[1] == dw).all()) and bool((got[2] == db).all())
    assert not bool((dx == want).all())
    for other in (pending.astype(np.float32 if dtype == np.float64 else np.float64), pending[:, :1]):
        ctx.pending = {0: other}
        assert bool((LN.backward(ctx, dout)[0] == dx).all()) and ctx.pending.get(0) is other
    ctx.needs_input_grad, ctx.pending = (False, True, True), {0: pending}
    assert LN.backward(ctx, dout)[0] is None and ctx.pending.get(0) is pending
    wide, ctx = cp.asarray(randn(rng, 2, 1100, dtype=dtype)), Context((True,) * 3)   # the op's own path: nothing taken
    LN.forward(ctx, wide)
    ctx.pending = {0: wide}
    assert ctx.reference and LN.backward(ctx, wide)[0] is not None and ctx.pending.get(0) is wide


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_blocks_with_the_residual_sum_in_layer_norm_equal_the_separate_add(dtype, monkeypatch):
    """Two residual blocks (x + gelu(layer_norm(x)) * s) on the GPU: every gradient is the same bit for bit
    whether LayerNorm's backward adds the residual stream's gradient into dx or the autograd adds it (the hint
    off), and with it on, both LayerNorms did add it. Under bf16 autocast (float32) LayerNormBF16Cuda the same."""
    from tinygrad_llm import precision
    from tinygrad_llm.kernels.cuda import mixed_elementwise
    ln = kernels().layer_norm
    rng = np.random.default_rng(7)
    # s as large as x: its gradient needs no column sum (a cuBLAS product, whose algorithm is chosen by timing)
    arrays = [randn(rng, 2, 33, 96, dtype=dtype)] + [randn(rng, 96, dtype=dtype) for _ in range(4)] + [
        randn(rng, 2, 33, 96, dtype=dtype)]
    dout = backend.to_device(randn(rng, 2, 33, 96, dtype=dtype), "cuda")
    taken = []
    take = ln._take_pending
    monkeypatch.setattr(ln, "_take_pending", lambda ctx, x: taken.append(take(ctx, x)) or taken[-1])

    def grads(mixed):
        x0, w1, b1, w2, b2, s = (Tensor(backend.to_device(a, "cuda"), requires_grad=True) for a in arrays)
        with precision.autocast("bfloat16" if mixed else None):
            x = x0 * 1.5
            for w, b in ((w1, b1), (w2, b2)):
                x = x + F.gelu(F.layer_norm(x, w, b)) * s
            (x * Tensor(dout)).sum().backward()
        return [t.grad for t in (x0, w1, b1, w2, b2, s)]

    for mixed in (False, True) if dtype == np.float32 else (False,):
        taken.clear()
        fused = grads(mixed)
        assert len(taken) == 2 and all(t is not None for t in taken)
        with monkeypatch.context() as m:
            m.setattr(ln.LayerNormCuda, "sums_pending", ())
            m.setattr(mixed_elementwise.LayerNormBF16Cuda, "sums_pending", ())
            taken.clear()
            separate = grads(mixed)
            assert taken == [None, None]
        for g, h in zip(fused, separate):
            assert g.dtype == dtype and bool((g == h).all())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("N,M", [(1, 1), (7, 33), (64, 384), (300, 1000), (64 * 256, 1152), (20000, 65), (0, 5)])
def test_column_sums_equal_float64_and_repeat_bit_for_bit(N, M, dtype):
    import cupy as cp
    from tinygrad_llm.kernels.cuda import columns
    rng = np.random.default_rng(N * 7 + M)
    a = randn(rng, N, M, dtype=dtype) + 0.5
    d = cp.asarray(a)
    got = columns.column_sums(d)
    assert got.shape == (M,) and got.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 2e-6 * max(1.0, np.sqrt(N))
    assert rel_err(got, a.astype(np.float64).sum(axis=0)) < tol
    assert bool((columns.column_sums(d) == got).all())   # no atomics: the same sums in the same order
    assert rel_err(columns.column_sums(d[:, ::2]), a[:, ::2].astype(np.float64).sum(axis=0)) < tol  # a strided view
    if N * M > 1:   # off a 16-byte boundary: a column a lane instead of 16 bytes, the same sums to rounding
        off = cp.empty(N * M + 1, dtype=dtype)[1:].reshape(N, M)
        off[...] = d
        assert not columns.vector(M, off) and rel_err(columns.column_sums(off), a.astype(np.float64).sum(axis=0)) < tol


@pytest.mark.parametrize("N,M", [(5, 3), (64 * 256, 384), (1000, 1536)])
def test_column_sums_with_bf16_out_write_the_conversion_kernel_bits(N, M):
    import cupy as cp
    from tinygrad_llm.kernels.cuda import columns, mixed
    rng = np.random.default_rng(M)
    a = (rng.standard_normal((N, M)) * 10.0 ** rng.integers(-5, 5, (N, M))).astype(np.float32)
    a.flat[:3] = [np.inf, np.nan, -0.0]
    d = cp.asarray(a)
    bf = cp.full((N, M), 0xABCD, dtype=np.uint16)
    sums = columns.column_sums(d, bf16_out=bf)
    np.testing.assert_array_equal(bf.get(), mixed.to_bf16(d).get())
    assert bool((cp.isnan(sums[1:2])).all()) and not bool(cp.isnan(sums[3:]).any())
    finite = np.nan_to_num(a, nan=0.0, posinf=0.0).astype(np.float64)
    assert rel_err(sums[3:], finite.sum(axis=0)[3:]) < 1e-5
    with pytest.raises(TypeError, match="bf16_out"):
        columns.column_sums(d, bf16_out=cp.empty((N, M), dtype=np.float32))
    off = cp.empty(N * M + 1, dtype=np.uint16)[1:].reshape(N, M)
    if M % 4 == 0:   # d is a fresh (256-byte aligned) float32 array: 16-byte lanes, 8-byte stores, refused off that
        with pytest.raises(TypeError, match="8-byte boundary"):
            columns.column_sums(d, bf16_out=off)
    else:            # a column a lane: any output will do
        columns.column_sums(d, bf16_out=off)
        np.testing.assert_array_equal(off.get(), bf.get())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("V", [1, 13, 65, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_kernel_equals_reference(V, reduction, dtype):
    rng = np.random.default_rng(5)
    logits = randn(rng, 4, 33, V, dtype=dtype, scale=10)
    targets = rng.integers(0, V, (4, 33))
    targets[0, :5] = -100
    compare_kernel(F.CrossEntropy, kernels().cross_entropy.CrossEntropyCuda, [logits, targets],
                   dict(ignore_index=-100, reduction=reduction), dtype)


def test_cross_entropy_kernel_all_ignored_gives_zero():
    import cupy as cp
    ctx = Context((True, False))
    logits = cp.asarray(np.ones((2, 3, 5), np.float32))
    loss = kernels().cross_entropy.CrossEntropyCuda.forward(ctx, logits, cp.full((2, 3), -100), ignore_index=-100, reduction="mean")
    assert float(loss) == 0.0
    dx, _ = kernels().cross_entropy.CrossEntropyCuda.backward(ctx, cp.ones((), np.float32))
    assert float(abs(dx).max()) == 0.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_kernel_equals_reference(approximate, dtype):
    x = randn(np.random.default_rng(6), 5, 301, dtype=dtype, scale=4)
    x[0, :4] = [0, -40, 40, -3]
    compare_kernel(F.GELU, kernels().elementwise.GELUCuda, [x], dict(approximate=approximate), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape, TK, causal", [((2, 3, 17, 8), 17, True), ((1, 2, 64, 32), 64, False),
                                               ((2, 1, 5, 8), 11, True)], ids=str)
def test_attention_dropout_kernel_equals_reference_with_the_same_mask(shape, TK, causal, dtype):
    """The kernel's mask is the dropout hash of its seed (the first draw of the generator); handed to the
    reference's context, forward and backward must agree to rounding."""
    import cupy as cp
    cuda, p = kernels(), 0.3
    rng = np.random.default_rng(4)
    q = cp.asarray(randn(rng, *shape, dtype=dtype))
    k, v = (cp.asarray(randn(rng, *shape[:2], TK, shape[3], dtype=dtype)) for _ in range(2))
    ctx_ker, ctx_ref = Context((True, True, True, False)), Context((True, True, True, False))
    out_ker = cuda.attention.ScaledDotProductAttentionCuda.forward(ctx_ker, q, k, v, None, causal=causal, scale=0.4, dropout_p=p,
                                               rng=np.random.default_rng(9))
    seed = np.uint64(np.random.default_rng(9).integers(0, 2 ** 63))
    mask = cuda.elementwise._dropout_apply(cp.ones(shape[:3] + (TK,), dtype), seed, np.float32(p), dtype(1 / (1 - p)),
                                          np.uint64(0))
    F.ScaledDotProductAttention.forward(ctx_ref, q, k, v, None, causal=causal, scale=0.4)
    ctx_ref.drop = mask
    out_ref = (ctx_ref.p * mask) @ v
    assert rel_err(out_ker, out_ref) < TOL[dtype]
    assert rel_err(ctx_ker.pd, ctx_ref.p * mask) < TOL[dtype]
    dout = cp.asarray(randn(np.random.default_rng(5), *out_ref.shape, dtype=dtype))
    for g_ker, g_ref in zip(cuda.attention.ScaledDotProductAttentionCuda.backward(ctx_ker, dout)[:3],
                            F.ScaledDotProductAttention.backward(ctx_ref, dout)[:3]):
        assert g_ker.dtype == g_ref.dtype and rel_err(g_ker, g_ref) < TOL[dtype]


def test_attention_dropout_kernel_statistics_reproducibility_and_p_zero():
    import cupy as cp
    cuda, p = kernels(), 0.2
    rng = np.random.default_rng(6)
    q, k, v = (cp.asarray(randn(rng, 4, 4, 128, 16, dtype=np.float32)) for _ in range(3))
    ctx = Context((True, True, True, False))
    out = cuda.attention.ScaledDotProductAttentionCuda.forward(ctx, q, k, v, None, causal=False, scale=0.25, dropout_p=p,
                                           rng=np.random.default_rng(0))
    dropped = float((ctx.pd == 0).mean())   # softmax over all keys: no probability is exactly 0 otherwise
    assert abs(dropped - p) < 0.005           # 262144 draws: 5 standard deviations is 0.004
    kept = ctx.pd != 0
    assert rel_err(ctx.pd[kept], ctx.p[kept] / (1 - p)) < 1e-6
    # averaged over many masks, attention dropout leaves the output unchanged in expectation
    plain = cuda.attention.ScaledDotProductAttentionCuda.forward(Context((False,) * 4), q, k, v, None, causal=False, scale=0.25)
    gen = np.random.default_rng(1)
    mean = sum(cuda.attention.ScaledDotProductAttentionCuda.forward(Context((False,) * 4), q[:1, :1], k[:1, :1], v[:1, :1], None,
                                                causal=False, scale=0.25, dropout_p=p, rng=gen) for _ in range(400)) / 400
    assert float(abs(mean - plain[:1, :1]).max()) < 0.1
    again = cuda.attention.ScaledDotProductAttentionCuda.forward(Context((False,) * 4), q, k, v, None, causal=False, scale=0.25,
                                             dropout_p=p, rng=np.random.default_rng(0))
    assert bool((again == out).all())
    zero = cuda.attention.ScaledDotProductAttentionCuda.forward(Context((False,) * 4), q, k, v, None, causal=False, scale=0.25, dropout_p=0.0)
    assert bool((zero == plain).all())
    # the public op on cuda tensors goes through the kernel and draws one seed from rng
    t = [Tensor(a) for a in (q, k, v)]
    a = F.scaled_dot_product_attention(*t, dropout_p=p, rng=np.random.default_rng(3)).numpy()
    b = F.scaled_dot_product_attention(*t, dropout_p=p, rng=np.random.default_rng(3)).numpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_multi_tensor_adamw_and_clip_equal_references(dtype):
    import cupy as cp
    from tinygrad_llm.optim import adamw_update_group, clip_grads
    cuda = kernels()
    rng = np.random.default_rng(8)
    shapes = [(33, 17), (5,), (1,), (64, 3, 2), (1000,)]
    def arrays(positive=False):
        return [np.abs(randn(rng, *s, dtype=dtype)) if positive else randn(rng, *s, dtype=dtype) for s in shapes]
    p, g, m, v = arrays(), arrays(), arrays(), arrays(positive=True)
    ref = [[cp.asarray(a) for a in group] for group in (p, g, m, v)]
    ker = [[cp.asarray(a) for a in group] for group in (p, g, m, v)]
    for step in (1, 2, 50):
        adamw_update_group(*ref, 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
        cuda.optim.adamw_update_group_cuda(*ker, 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
    for group_ker, group_ref in zip(ker, ref):
        for a, b in zip(group_ker, group_ref):
            assert rel_err(a, b) < TOL[dtype]
    for max_norm in (0.5, 1e6):   # clipped, and not (then every gradient is left bitwise as it was)
        grads_cpu = [a.copy() for a in g]
        grads_gpu = [cp.asarray(a) for a in g]
        total_cpu = clip_grads(grads_cpu, max_norm)
        total_gpu = cuda.optim.clip_grads_cuda(grads_gpu, max_norm)
        assert backend.is_cupy_array(total_gpu) and total_gpu.shape == ()
        assert abs(float(total_gpu) - total_cpu) / total_cpu < TOL[dtype]
        for a, b in zip(grads_gpu, grads_cpu):
            assert rel_err(a, b) < TOL[dtype]
        if max_norm > 1:
            for a, b in zip(grads_gpu, g):
                np.testing.assert_array_equal(a.get(), b)
    assert backend.accelerated(clip_grads, grads_gpu[0]) is cuda.optim.clip_grads_cuda
    assert backend.accelerated(adamw_update_group, grads_gpu[0]) is cuda.optim.adamw_update_group_cuda


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_leaf_gradients_copied_added_and_zeroed_in_one_launch(dtype):
    """The leaves' gradients in one multi-tensor launch each way: first ones copied (the same bits in new memory),
    later ones added in place, a graph's kept ones zeroed; what the kernels do not take (one array, mixed dtypes,
    a strided view) goes array by array, with the same results."""
    import cupy as cp
    from tinygrad_llm.leaf_grads import add_arrays, copy_arrays
    cuda = kernels()
    rng = np.random.default_rng(9)
    sources = [cp.asarray(randn(rng, *s, dtype=dtype)) for s in [(33, 17), (5,), (1,), (0, 4), (64, 3, 2), (1000,)]]
    copies = cuda.grads.copy_arrays_cuda(sources)
    for a, c in zip(sources, copies):
        assert c.dtype == a.dtype and c.shape == a.shape and (a.size == 0 or c.data.ptr != a.data.ptr)
        np.testing.assert_array_equal(c.get(), a.get())
    copies[0][...] = 0   # new memory: the source is untouched
    assert float(abs(sources[0]).max()) > 0
    view = cp.asarray(randn(rng, 6, 8, dtype=dtype))[:, ::2]
    mixed = [sources[0], sources[1].astype(np.float32 if dtype == np.float64 else np.float64), view]
    for group in ([sources[0]], mixed, [sources[0], view]):
        for a, c in zip(group, cuda.grads.copy_arrays_cuda(group)):
            assert c.dtype == a.dtype and c.data.ptr != a.data.ptr
            np.testing.assert_array_equal(c.get(), a.get())
    assert backend.accelerated(copy_arrays, sources[0]) is cuda.grads.copy_arrays_cuda
    assert backend.accelerated(add_arrays, sources[0]) is cuda.grads.add_arrays_cuda
    others = [cp.asarray(randn(rng, *a.shape, dtype=dtype)) for a in sources]
    for group in (list(range(len(sources))), [0], [0, 1]):
        targets = [sources[i].copy() for i in group]
        expected = [(sources[i] + others[i]).get() for i in group]
        adds = [others[i] for i in group]
        if group == [0, 1]:
            adds[1] = cp.asarray(randn(rng, 10, dtype=dtype))[::2]   # a strided view: array by array
            expected[1] = (sources[1] + adds[1]).get()
        cuda.grads.add_arrays_cuda(targets, adds)
        for t, e in zip(targets, expected):
            np.testing.assert_array_equal(t.get(), e)
    shared = cp.zeros(4, dtype)   # one array as two targets (threads would race): array by array, both added
    cuda.grads.add_arrays_cuda([shared, shared], [cp.ones(4, dtype), cp.full(4, 2, dtype)])
    np.testing.assert_array_equal(shared.get(), np.full(4, 3, dtype))
    flat = cp.zeros(12, dtype)    # separate views of one buffer (a flat gradient buffer): one launch, right sums
    cuda.grads.add_arrays_cuda([flat[:5], flat[5:]], [cp.ones(5, dtype), cp.full(7, 2, dtype)])
    np.testing.assert_array_equal(flat.get(), np.array([1] * 5 + [2] * 7, dtype))
    assert cuda.grads._sharing([flat[:6], flat[5:]], []) and cuda.grads._sharing([flat[:5]], [flat[4:6]])
    assert not cuda.grads._sharing([flat[:5], flat[5:]], []) and not cuda.grads._sharing([flat[:5]], [flat[5:]])
    cuda.grads.zero_arrays(others)
    assert not any(bool((a != 0).any()) for a in others)
    cuda.grads.zero_arrays([view])
    assert not bool((view != 0).any())
    # through the autograd: two leaves fed one array (Add's backward) get two gradients in separate memory
    x, y = (Tensor(cp.asarray(randn(rng, 4, 3, dtype=dtype)), requires_grad=True) for _ in range(2))
    (x + y).sum().backward()
    assert x.grad.data.ptr != y.grad.data.ptr
    x.grad += 1
    np.testing.assert_array_equal(x.grad.get(), np.full((4, 3), 2, dtype))
    np.testing.assert_array_equal(y.grad.get(), np.ones((4, 3), dtype))
    (x * 3 + y).sum().backward()   # accumulated: added into both, in one launch
    np.testing.assert_array_equal(x.grad.get(), np.full((4, 3), 5, dtype))
    np.testing.assert_array_equal(y.grad.get(), np.full((4, 3), 2, dtype))


def test_clip_grad_norm_on_gpu_returns_a_device_scalar_without_syncing():
    import math
    import cupy as cp
    params = [Tensor(cp.ones((3, 4), np.float32), requires_grad=True), Tensor(cp.ones(5, np.float32), requires_grad=True)]
    for t in params:
        t.grad = cp.full(t.shape, 2.0, np.float32)
    norm = clip_grad_norm(params, 1.0)
    assert backend.is_cupy_array(norm) and math.isfinite(norm)
    assert abs(float(norm) - math.sqrt(17 * 4)) < 1e-5
    assert abs(float(cp.sqrt(sum((t.grad ** 2).sum() for t in params))) - 1.0) < 1e-5
    params[0].grad[0, 0] = cp.nan
    assert not math.isfinite(clip_grad_norm(params, 1.0))   # train.py's check still sees a NaN


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_adamw_kernel_equals_reference(dtype):
    import cupy as cp
    rng = np.random.default_rng(7)
    arrays = [randn(rng, 33, 17, dtype=dtype) for _ in range(3)] + [np.abs(randn(rng, 33, 17, dtype=dtype))]
    ref = [cp.asarray(a) for a in arrays]
    ker = [cp.asarray(a) for a in arrays]
    for step in (1, 2, 50):
        adamw_update(ref[0], ref[1], ref[2], ref[3], 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
        kernels().optim.adamw_update_cuda(ker[0], ker[1], ker[2], ker[3], 1e-2, 0.9, 0.99, 1e-8, 0.1, step)
    for a, b in zip(ker, ref):
        assert rel_err(a, b) < TOL[dtype]


def test_dropout_kernel_mask_is_shared_scaled_and_reproducible():
    import cupy as cp
    cuda = kernels()
    x = cp.asarray(np.random.default_rng(8).standard_normal((64, 1000)).astype(np.float32)) + 5
    ctx = Context((True,))
    y = cuda.elementwise.DropoutCuda.forward(ctx, x, p=0.2, rng=np.random.default_rng(0))
    kept = y != 0
    assert abs(float(kept.mean()) - 0.8) < 0.01
    assert rel_err(y[kept], x[kept] / 0.8) < 1e-6
    dx = cuda.elementwise.DropoutCuda.backward(ctx, cp.ones_like(x))
    assert bool(((dx != 0) == kept).all()) and rel_err(dx[kept], cp.full(int(kept.sum()), 1 / 0.8)) < 1e-6
    again = cuda.elementwise.DropoutCuda.forward(Context((True,)), x, p=0.2, rng=np.random.default_rng(0))
    assert bool((again == y).all())
    other = cuda.elementwise.DropoutCuda.forward(Context((True,)), x, p=0.2, rng=np.random.default_rng(1))
    assert not bool((other == y).all())
    assert float(abs(cuda.elementwise.DropoutCuda.forward(Context((True,)), x, p=1.0, rng=np.random.default_rng(0))).max()) == 0



def _dropout_add_inputs(layout, dtype):
    """x, y, dout on the GPU: 16-byte aligned C-contiguous (the vector kernel, with a tail), or an odd size, 4 or
    8 bytes off a 16-byte boundary, or strided (the ElementwiseKernel), or only y strided."""
    import cupy as cp
    rng = np.random.default_rng(17)
    base = [cp.asarray(randn(rng, 47, 1003 * 2 + 1, dtype=dtype)) for _ in range(3)]   # 47 x 1003: a tail
    if layout == "aligned":
        return [cp.ascontiguousarray(b[:, :1003]) for b in base]
    if layout == "odd":
        return [cp.ascontiguousarray(b[:7, :13]) for b in base]
    if layout == "offset":
        return [b.reshape(-1)[1:47 * 1003 + 1].reshape(47, 1003) for b in base]
    if layout == "strided":
        return [b[:, 1::2] for b in base]
    return [cp.ascontiguousarray(base[0][:, ::2]), base[1][:, ::2], cp.ascontiguousarray(base[2][:, ::2])]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", ["aligned", "odd", "offset", "strided", "y_strided"])
def test_dropout_add_kernel_is_add_of_the_dropout_kernel_bit_for_bit(layout, dtype):
    """DropoutAddCuda(x, y) == AddCuda(x, DropoutCuda(y)) with the same generator seed, bit for bit, forward and
    both gradients (dx = dout; dy = DropoutCuda.backward's), on every layout."""
    import cupy as cp
    cuda = kernels()
    x, y, dout = _dropout_add_inputs(layout, dtype)
    ctx = Context((True, True))
    out = cuda.elementwise.DropoutAddCuda.forward(ctx, x, y, p=0.3, rng=np.random.default_rng(4))
    assert not ctx.reference and out.dtype == dtype and out.shape == y.shape
    ctx_drop = Context((True,))
    dropped = cuda.elementwise.DropoutCuda.forward(ctx_drop, y, p=0.3, rng=np.random.default_rng(4))
    assert bool((out == cuda.elementwise.AddCuda.forward(Context((True, True)), x, dropped)).all())
    assert bool((out == x + dropped).all())
    kept = float((dropped != 0).mean())
    assert 0.6 < kept < 0.8 if y.size > 1000 else 0 < kept < 1
    dx, dy = cuda.elementwise.DropoutAddCuda.backward(ctx, dout)
    assert dx is dout
    assert bool((dy == cuda.elementwise.DropoutCuda.backward(ctx_drop, dout)).all())
    only_y = Context((False, True))
    cuda.elementwise.DropoutAddCuda.forward(only_y, x, y, p=0.3, rng=np.random.default_rng(4))
    none, dy_only = cuda.elementwise.DropoutAddCuda.backward(only_y, dout)
    assert none is None and bool((dy_only == dy).all())
    # the functional op reaches the kernel, and with the same seed gives the same bits through the autograd
    assert backend.accelerated(F.DropoutAdd, x, y) is cuda.elementwise.DropoutAddCuda
    tx, ty = Tensor(x, requires_grad=True), Tensor(y, requires_grad=True)
    fused = F.dropout_add(tx, ty, 0.3, rng=np.random.default_rng(4))
    (fused * Tensor(dout)).sum().backward()
    assert bool((fused.data == out).all()) and bool((ty.grad == dy).all()) and bool((tx.grad == dout).all())
    assert cp.get_array_module(tx.grad) is cp


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=["float64", "float32", "float16"])
def test_dropout_add_kernel_reference_paths_p_one_and_other_dtypes(dtype):
    """p = 1 (both dtypes served) and float16 (not served) take the op's formula, as DropoutCuda does: the mask
    drawn on the host from the generator, so the result equals the CPU op's with the same seed."""
    import cupy as cp
    cuda = kernels()
    rng = np.random.default_rng(5)
    x, y, dout = (randn(rng, 9, 31).astype(dtype) for _ in range(3))
    for p in ([1.0, 0.3] if dtype == np.float16 else [1.0]):
        ctx = Context((True, True))
        out = cuda.elementwise.DropoutAddCuda.forward(ctx, cp.asarray(x), cp.asarray(y), p=p, rng=np.random.default_rng(6))
        dx, dy = cuda.elementwise.DropoutAddCuda.backward(ctx, cp.asarray(dout))
        assert ctx.reference and out.dtype == dtype
        ctx_cpu = Context((True, True))
        want = F.DropoutAdd.forward(ctx_cpu, x, y, p=p, rng=np.random.default_rng(6))
        want_dx, want_dy = F.DropoutAdd.backward(ctx_cpu, dout)
        np.testing.assert_array_equal(out.get(), want)
        np.testing.assert_array_equal(dx.get(), want_dx)
        np.testing.assert_array_equal(dy.get(), want_dy)
        if p == 1:
            np.testing.assert_array_equal(out.get(), x)
            assert not bool(dy.any())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpt_on_gpu_with_fused_residual_dropout_equals_dropout_then_add(dtype, monkeypatch):
    """The block's fused dropout-add against Dropout then Add (Block.forward as it was): the loss bit for bit
    (every op's output is: DropoutAddCuda == AddCuda(x, DropoutCuda(y)) bit for bit and the seeds are drawn in
    the same order), the gradients to 1e-5 relative in float32 and 1e-12 in float64, not bit for bit: the
    embedding's scatter-add and the flash kernels' dq sum with atomics, in any order (two identical runs differ
    as much; test_dropout_training_runs_on_gpu_and_is_reproducible)."""
    from tinygrad_llm.model import Block
    cuda = kernels()
    cfg = GPTConfig(**SMALL, dropout=0.2, dtype=dtype)
    runs, calls, forward = [], [], cuda.elementwise.DropoutAddCuda.forward

    def counted(ctx, *args, **kwargs):
        calls.append(1)
        return forward(ctx, *args, **kwargs)
    monkeypatch.setattr(cuda.elementwise.DropoutAddCuda, "forward", staticmethod(counted))
    for fused in (True, False):
        if not fused:
            def unfused(self, x, rng=None, kv_cache=None, layer=0):
                x = x + self.attn(self.ln_1(x), rng, kv_cache, layer)
                return x + self.mlp(self.ln_2(x), rng)
            monkeypatch.setattr(Block, "forward", unfused)
        model = GPT(cfg, rng=np.random.default_rng(0)).to("cuda")
        rng = np.random.default_rng(3)
        _, loss = model(*batch(0), rng=rng)
        loss.backward()
        runs.append((loss.item(), [p.grad.get() for p in model.parameters()], rng.random()))
        assert len(calls) == 2 * cfg.n_layer   # the fused run's, and none from the unfused run
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2]
    for (name, _), a, b in zip(model.named_parameters(), runs[0][1], runs[1][1]):
        assert rel_err(a, b) < (1e-5 if dtype == "float32" else 1e-12), name

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("B, T, NH, HS", [(2, 33, 3, 5), (1, 64, 2, 32), (3, 1, 1, 4)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("row_blocks", [1, 2, 3])
@pytest.mark.parametrize("one_call", [True, False], ids=["heads_in_one_call", "a_call_a_head"])
def test_self_attention_kernel_equals_reference(B, T, NH, HS, causal, dtype, row_blocks, one_call, monkeypatch):
    """The in-place strided products on the packed qkv == unpack, attend (the NumPy-formula reference), merge."""
    import cupy as cp
    rng = np.random.default_rng(B * 100 + T)
    qkv = cp.asarray(randn(rng, B, T, 3 * NH * HS, dtype=dtype))
    dout = cp.asarray(randn(rng, B, T, NH * HS, dtype=dtype))
    monkeypatch.setattr(kernels().attention, "ROW_BLOCKS", row_blocks)
    if one_call:
        assert kernels().cublas.batched_gemm() is not None, kernels().cublas.batched_gemm.error
    monkeypatch.setattr(kernels().cublas, "HEADS_IN_ONE_CALL", one_call)
    # NaN in the pool's free blocks: the causal products leave score blocks unwritten, which must never be read
    poison = cp.full(4 * B * NH * T * T + 4096, np.nan, dtype=dtype)
    del poison
    ctx = Context((True,))
    out_ker = kernels().attention.SelfAttentionCuda.forward(ctx, qkv, NH, causal=causal, scale=0.3)
    d_ker = kernels().attention.SelfAttentionCuda.backward(ctx, dout)
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "0")   # no kernel inside the reference either
    ctx = Context((True,))
    out_ref = F.SelfAttention.forward(ctx, qkv, NH, causal=causal, scale=0.3)
    d_ref = F.SelfAttention.backward(ctx, dout)
    for ker, ref in ((out_ker, out_ref), (d_ker, d_ref)):
        assert ker.dtype == ref.dtype and ker.shape == ref.shape and backend.device_of(ker) == "cuda"
        assert rel_err(ker, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_self_attention_kernel_with_dropout_equals_the_split_heads_kernel(dtype):
    """Same (B, NH, T, T) scores and the same seed from the same generator: the same mask as
    ScaledDotProductAttentionCuda on the unpacked heads, so the two paths agree to rounding."""
    import cupy as cp
    B, T, NH, HS = 2, 40, 3, 8
    qkv = cp.asarray(randn(np.random.default_rng(3), B, T, 3 * NH * HS, dtype=dtype))
    dout = cp.asarray(randn(np.random.default_rng(4), B, T, NH * HS, dtype=dtype))
    ctx = Context((True,))
    out = kernels().attention.SelfAttentionCuda.forward(ctx, qkv, NH, scale=0.35, dropout_p=0.3, rng=np.random.default_rng(8))
    dqkv = kernels().attention.SelfAttentionCuda.backward(ctx, dout)
    x = Tensor(qkv, requires_grad=True)
    q, k, v = [t.reshape(B, T, NH, HS).permute(0, 2, 1, 3) for t in x.split(NH * HS, axis=2)]
    y = F.scaled_dot_product_attention(q, k, v, scale=0.35, dropout_p=0.3, rng=np.random.default_rng(8))
    y = y.permute(0, 2, 1, 3).reshape(B, T, NH * HS)
    (y * Tensor(dout)).sum().backward()
    plain = kernels().attention.SelfAttentionCuda.forward(Context((True,)), qkv, NH, scale=0.35)
    assert rel_err(out, plain) > 1e-2    # dropout did drop
    assert rel_err(out, y.data) < TOL[dtype]
    assert rel_err(dqkv, x.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("save", ["lse", "p", "p+pd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_self_attention_save_modes_equal_the_split_heads_kernel(save, causal, dropout_p, dtype, monkeypatch):
    """Whatever the cuBLAS path keeps for backward (attention.SAVE: the log-sum-exp and S recomputed, P and
    Pd redrawn, or both kept), forward and backward equal the split-heads kernel (which keeps P and Pd, and
    which test_attention_dropout_kernel_equals_reference_with_the_same_mask ties to the NumPy reference) to
    rounding, with the same dropout mask; NaN in the pool's free blocks must never be read."""
    import cupy as cp
    attention = kernels().attention
    monkeypatch.setattr(attention, "SAVE", save)
    monkeypatch.setattr(attention, "FLASH", "0")
    B, T, NH, HS = 2, 37, 3, 8
    qkv = cp.asarray(randn(np.random.default_rng(11), B, T, 3 * NH * HS, dtype=dtype))
    dout = cp.asarray(randn(np.random.default_rng(12), B, T, NH * HS, dtype=dtype))
    poison = cp.full(6 * B * NH * T * T + 4096, np.nan, dtype=dtype)
    del poison
    ctx = Context((True,))
    out = attention.SelfAttentionCuda.forward(ctx, qkv, NH, causal=causal, scale=0.4, dropout_p=dropout_p,
                                              rng=np.random.default_rng(8))
    kept = {name for name in ("p", "pd", "lse") if getattr(ctx, name, None) is not None}
    assert kept == {"lse": {"lse"}, "p": {"p"}, "p+pd": {"p", "pd"}}[save]
    dqkv = attention.SelfAttentionCuda.backward(ctx, dout)
    x = Tensor(qkv, requires_grad=True)
    q, k, v = [t.reshape(B, T, NH, HS).permute(0, 2, 1, 3) for t in x.split(NH * HS, axis=2)]
    y = F.scaled_dot_product_attention(q, k, v, causal=causal, scale=0.4, dropout_p=dropout_p,
                                       rng=np.random.default_rng(8))
    y = y.permute(0, 2, 1, 3).reshape(B, T, NH * HS)
    (y * Tensor(dout)).sum().backward()
    assert rel_err(out, y.data) < TOL[dtype]
    assert rel_err(dqkv, x.grad) < TOL[dtype]


def test_self_attention_keeping_the_log_sum_exp_holds_no_scores_after_forward(monkeypatch):
    """SAVE "lse": after forward the pool holds the output and the B*NH*T log-sum-exps, nothing (T, T);
    "p" the output and P, "p+pd" the output, P and Pd (with dropout)."""
    import cupy as cp
    attention = kernels().attention
    monkeypatch.setattr(attention, "FLASH", "0")
    B, T, NH, HS = 4, 256, 2, 32
    qkv = cp.asarray(randn(np.random.default_rng(1), B, T, 3 * NH * HS, dtype=np.float32))
    pool, tt = cp.get_default_memory_pool(), B * NH * T * T * 4
    for save, kept_tt in (("lse", 0), ("p", 1), ("p+pd", 2)):
        monkeypatch.setattr(attention, "SAVE", save)
        for _ in range(2):   # the first call also makes the cached pointer tables (in the same pool)
            before = pool.used_bytes()
            ctx = Context((True,))
            y = attention.SelfAttentionCuda.forward(ctx, qkv, NH, scale=0.2, dropout_p=0.1,
                                                    rng=np.random.default_rng(0))
            lse = B * NH * T * 4 if save == "lse" else 0
            held = pool.used_bytes() - before - y.nbytes - lse   # less the output (and the log-sum-exps)
            del ctx, y
        assert kept_tt * tt <= held <= kept_tt * tt + 1024, (save, held)


def test_attention_save_switch_and_the_flash_memory_rule(monkeypatch):
    attention = kernels().attention
    monkeypatch.setattr(attention, "FLASH", "auto")
    B, NH, T = 1, 1, 2048
    memory = attention.cp.cuda.runtime.getDeviceProperties(attention.cp.cuda.Device().id)["totalGlobalMem"]
    # a batch whose 2 (T, T) arrays just fit in the share, and 3 do not
    B = int(attention.FLASH_MEMORY_SHARE * memory / (2.5 * NH * T * T * 4))
    monkeypatch.setattr(attention, "SAVE", "lse")
    assert attention.tt_buffers() == 2 and not attention.use_flash(B, NH, T, 128, np.float32)
    monkeypatch.setattr(attention, "SAVE", "p")
    assert attention.tt_buffers() == 2 and not attention.use_flash(B, NH, T, 128, np.float32)
    monkeypatch.setattr(attention, "SAVE", "p+pd")
    assert attention.tt_buffers() == 3 and attention.use_flash(B, NH, T, 128, np.float32)
    monkeypatch.setattr(attention, "SAVE", "all")
    with pytest.raises(ValueError, match="TINYGRAD_LLM_ATTENTION_SAVE must be lse, p or p\\+pd"):
        attention.save_mode()


def test_self_attention_kernel_follows_the_tf32_switch():
    cuda = kernels()
    import cupy as cp
    rng = np.random.default_rng(10)
    qkv = cp.asarray(randn(rng, 2, 128, 3 * 128, dtype=np.float32, scale=3.0))
    exact = F.SelfAttention.forward(Context((False,)), qkv.astype(np.float64), 2, scale=1.0)
    off = cuda.attention.SelfAttentionCuda.forward(Context((False,)), qkv, 2, scale=1.0)
    try:
        backend.set_tf32(True)
        on = cuda.attention.SelfAttentionCuda.forward(Context((False,)), qkv, 2, scale=1.0)
    finally:
        backend.set_tf32(False)
    assert rel_err(off, exact) < 1e-4
    assert rel_err(on, exact) > 3 * rel_err(off, exact)


@pytest.mark.parametrize("fp32_gemm", ["cublas", "3xtf32"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("x_shape, M", [((3, 7, 10), 8), ((5,), 3), ((64, 256, 384), 1152), ((33, 13), 7)], ids=str)
def test_linear_kernel_equals_reference(x_shape, M, dtype, fp32_gemm, monkeypatch):
    """x w + b with the bias in cuBLASLt's epilogue == matmul then add; the epilogue path really ran. With the
    3xTF32 GEMM on (TINYGRAD_LLM_FP32_GEMM), float32 shapes it takes go there (the bias added as it stores) and
    make no cuBLASLt plan."""
    cuda = kernels()
    monkeypatch.setattr(cuda.gemm_3xtf32, "MODE", fp32_gemm)
    calls, run = [], cuda.gemm_3xtf32.gemm
    monkeypatch.setattr(cuda.gemm_3xtf32, "gemm", lambda *args, **kwargs: calls.append(args) or run(*args, **kwargs))
    assert cuda.cublas.lt() is not None, cuda.cublas.lt.error
    rng = np.random.default_rng(len(x_shape) * 10 + M)
    x, w, b = randn(rng, *x_shape, dtype=dtype), randn(rng, x_shape[-1], M, dtype=dtype), randn(rng, M, dtype=dtype)
    compare_kernel(F.Linear, cuda.linear.LinearCuda, [x, w, b], {}, dtype)
    N = int(np.prod(x_shape[:-1]))
    key = (N, x_shape[-1], M, np.dtype(dtype), cuda.cublas.compute_type(dtype))
    taken = fp32_gemm == "3xtf32" and dtype == np.float32 and N >= 64 and M >= 64 and x_shape[-1] % 4 == 0
    if taken:   # forward, dx and dw
        assert len(calls) == 3
    else:
        assert cuda.cublas.lt().plans.get(key) is not None and not calls


def test_linear_kernel_with_mismatched_shapes_takes_the_reference_and_raises():
    """Linear.apply called directly (F.linear checks shapes first): no GEMM into a wrongly sized output."""
    import cupy as cp
    cuda = kernels()
    x, w = cp.ones((3, 5), np.float32), cp.ones((4, 6), np.float32)
    with pytest.raises(ValueError):
        cuda.linear.LinearCuda.forward(Context((True, True, True)), x, w, cp.ones(6, np.float32))
    with pytest.raises(ValueError):
        cuda.linear.LinearCuda.forward(Context((True, True, True)), cp.ones((3, 4), np.float32), w, cp.ones(5, np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("n", [1, 7, 4096, 100003])
def test_vector_kernels_equal_the_elementwise_kernels(n, dtype):
    """GELU (tanh) and dropout 16 bytes at a time == the one-element-a-thread ElementwiseKernels, tails and
    unaligned views (which take the ElementwiseKernel) included; dropout's mask bit for bit."""
    import cupy as cp
    cuda = kernels()
    rng = np.random.default_rng(n)
    base, dbase = cp.asarray(randn(rng, n + 1, dtype=dtype, scale=3.0)), cp.asarray(randn(rng, n + 1, dtype=dtype))
    seed, p, scale = np.uint64(123456789), np.float32(0.3), dtype(1 / 0.7)
    for x, d in ((base[:n], dbase[:n]), (base[1:], dbase[1:])):   # aligned, then 4 or 8 bytes off
        ctx = Context((True,))
        y = cuda.elementwise.GELUCuda.forward(ctx, x, approximate="tanh")
        dx = cuda.elementwise.GELUCuda.backward(ctx, d)
        tol = 1e-6 if dtype == np.float32 else 1e-14
        assert rel_err(y, cuda.elementwise._gelu_tanh_forward(x)) < tol
        assert rel_err(dx, cuda.elementwise._gelu_tanh_backward(x, d)) < tol
        assert bool((cuda.elementwise._dropout(x, np.uint64(0), seed, p, scale)
                     == cuda.elementwise._dropout_apply(x, seed, p, scale, np.uint64(0))).all())
        assert bool((cuda.elementwise.AddCuda.forward(Context((True, True)), x, d) == x + d).all())
    # other shapes (broadcasting) and a scalar take CuPy's add
    ctx = Context((True, True))
    assert bool((cuda.elementwise.AddCuda.forward(ctx, base[:n].reshape(1, n), base[:1]) == base[:n] + base[0]).all())
    assert ctx.shapes == ((1, n), (1,))


def test_kernels_serve_cuda_arrays_and_kernels_off_uses_references(monkeypatch):
    import cupy as cp
    cuda = kernels()
    a = cp.zeros(3, np.float32)
    assert backend.accelerated(F.LayerNorm, a) is cuda.layer_norm.LayerNormCuda
    assert backend.accelerated(F.SelfAttention, a) is cuda.attention.SelfAttentionCuda
    assert backend.accelerated(F.Linear, a) is cuda.linear.LinearCuda
    assert backend.accelerated(Add, a) is cuda.elementwise.AddCuda
    assert backend.accelerated(adamw_update, a) is cuda.optim.adamw_update_cuda
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "0")
    assert backend.accelerated(F.LayerNorm, a) is F.LayerNorm


def test_tf32_switch_is_off_by_default_and_opt_in():
    import cupy as cp
    rng = np.random.default_rng(9)
    a, b = randn(rng, 256, 256, dtype=np.float32), randn(rng, 256, 256, dtype=np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    off = cp.asarray(a) @ cp.asarray(b)
    try:
        backend.set_tf32(True)
        on = cp.asarray(a) @ cp.asarray(b)
    finally:
        backend.set_tf32(False)
    assert rel_err(off, exact) < 1e-5
    assert 1e-5 < rel_err(on, exact) < 1e-2
    assert rel_err(cp.asarray(a) @ cp.asarray(b), exact) < 1e-5


# ---- the whole model, a training step, checkpoints, sampling -------------------------------------

SMALL = dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)


def batch(seed, B=3, T=16):
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, 13, (B, T)), rng.integers(0, 13, (B, T))
    targets[0, :3] = -100
    return idx, targets


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("switches", [{}, dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False),
                                      dict(gelu_approximate="none", tie_embeddings=False)], ids=["gpt2", "modern", "exact-untied"])
def test_model_on_gpu_equals_cpu(switches, dtype):
    cfg = GPTConfig(**SMALL, dtype=dtype, **switches)
    cpu, gpu = GPT(cfg, rng=np.random.default_rng(0)), GPT(cfg, rng=np.random.default_rng(0)).to("cuda")
    assert gpu.device == "cuda"
    idx, targets = batch(1)
    logits_cpu, loss_cpu = cpu(idx, targets)
    logits_gpu, loss_gpu = gpu(idx, targets)
    loss_cpu.backward()
    loss_gpu.backward()
    tol = 1e-10 if dtype == "float64" else 1e-3
    assert rel_err(logits_gpu.data, logits_cpu.data) < tol
    assert rel_err(loss_gpu.item(), loss_cpu.item()) < tol
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert rel_err(p_gpu.grad, p_cpu.grad) < tol, name


def train_steps(model, steps, seed=0):
    opt = AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.99))
    losses = []
    for i in range(steps):
        idx, targets = batch(seed + i)
        _, loss = model(idx, targets)
        loss.backward()
        clip_grad_norm(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, opt


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_steps_on_gpu_equal_cpu(dtype):
    cfg = GPTConfig(**SMALL, dtype=dtype)
    cpu, gpu = GPT(cfg, rng=np.random.default_rng(0)), GPT(cfg, rng=np.random.default_rng(0)).to("cuda")
    losses_cpu, _ = train_steps(cpu, 5)
    losses_gpu, _ = train_steps(gpu, 5)
    tol = 1e-9 if dtype == "float64" else 2e-3
    assert rel_err(losses_gpu, losses_cpu) < tol
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert rel_err(p_gpu.data, p_cpu.data) < tol, name


def test_dropout_training_runs_on_gpu_and_is_reproducible():
    cfg = GPTConfig(**SMALL, dropout=0.2)
    runs = []
    for _ in range(2):
        model = GPT(cfg, rng=np.random.default_rng(0)).to("cuda")
        rng = np.random.default_rng(3)
        idx, targets = batch(0)
        _, loss = model(idx, targets, rng=rng)
        loss.backward()
        runs.append((loss.item(), model.transformer.wte.weight.grad.get()))
    assert runs[0][0] == runs[1][0]                 # the same masks: dropout draws from the seeded rng
    assert rel_err(runs[0][1], runs[1][1]) < 1e-5   # (the embedding's scatter-add sums in any order)


@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu"])
def test_checkpoint_moves_between_devices(tmp_path, direction):
    cfg = GPTConfig(**SMALL, dtype="float64")
    source_device, target_device = ("cuda", "cpu") if direction == "gpu_to_cpu" else ("cpu", "cuda")
    source = GPT(cfg, rng=np.random.default_rng(0)).to(source_device)
    _, opt = train_steps(source, 2)
    save_checkpoint(tmp_path / "ckpt.safetensors", source, opt, meta={"step": 2})
    target = GPT(cfg, rng=np.random.default_rng(1)).to(target_device)
    target_opt = AdamW(param_groups(target, 0.1), lr=1e-2, betas=(0.9, 0.99))
    assert load_checkpoint(tmp_path / "ckpt.safetensors", target, target_opt)["step"] == 2
    for (name, p), (_, q) in zip(source.named_parameters(), target.named_parameters()):
        assert q.device == target_device
        np.testing.assert_array_equal(q.numpy(), p.numpy(), err_msg=name)
    # the loaded optimizer state lives beside its parameters, and one more step gives the same weights
    state = next(iter(target_opt.state.values()))
    assert backend.device_of(state["exp_avg"]) == target_device
    idx, targets = batch(9)
    for model, o in ((source, opt), (target, target_opt)):
        _, loss = model(idx, targets)
        loss.backward()
        o.step()
    for (name, p), (_, q) in zip(source.named_parameters(), target.named_parameters()):
        assert rel_err(q.data, p.data) < 1e-12, name


def test_model_on_gpu_checks_ids_from_the_host_and_from_the_device():
    import cupy as cp
    model = GPT(GPTConfig(**SMALL), rng=np.random.default_rng(0)).to("cuda")
    idx, targets = batch(3)
    for move in (np.asarray, cp.asarray):          # NumPy ids are checked on the host, CuPy ids on the GPU
        bad = idx.copy()
        bad[1, 2] = 13
        with pytest.raises(ValueError, match=r"token ids \[13\] are outside the vocabulary \[0, 13\)"):
            model(move(bad), move(targets))
        bad = targets.copy()
        bad[0, 5] = -3
        with pytest.raises(ValueError, match=r"target ids \[-3\] are outside"):
            model(move(idx), move(bad))
        _, loss = model(move(idx), move(targets))
        assert backend.device_of(loss.data) == "cuda"


def test_sampling_on_gpu_equals_cpu():
    cfg = GPTConfig(**SMALL, dtype="float64")
    cpu, gpu = GPT(cfg, rng=np.random.default_rng(0)), GPT(cfg, rng=np.random.default_rng(0)).to("cuda")
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    greedy_cpu = generate(cpu, prompt, 20, temperature=0)       # runs past block_size: cache, then recompute
    greedy_gpu = generate(gpu, prompt, 20, temperature=0)
    np.testing.assert_array_equal(greedy_gpu, greedy_cpu)
    sampled_cpu = generate(cpu, prompt, 10, temperature=0.8, top_k=5, top_p=0.9, rng=np.random.default_rng(1))
    sampled_gpu = generate(gpu, prompt, 10, temperature=0.8, top_k=5, top_p=0.9, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(sampled_gpu, sampled_cpu)


def test_train_function_on_cuda_resumes(tmp_path):
    from tinygrad_llm.data import prepare
    from tinygrad_llm.train import TrainConfig, train
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    prepare(text, tmp_path / "data")
    common = dict(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), n_layer=1, n_head=2, n_embd=16,
                  block_size=16, batch_size=4, eval_interval=5, eval_iters=2, log_interval=0, sample_chars=20,
                  device="cuda", dropout=0.1, lr_decay_iters=10)   # the schedule stated: resumed with more iterations
    first = train(TrainConfig(max_iters=5, **common))
    assert first["model"].device == "cuda" and np.isfinite(first["best_val_loss"])
    resumed = train(TrainConfig(max_iters=10, init_from="resume", **common))
    assert resumed["iters"] == 10 and np.isfinite(resumed["final_val_loss"])
