"""bf16 mixed precision on the CPU (precision.py's policy; kernels/cpu/mkl.py, mixed.py, mixed_attention.py):
MKL's bf16 GEMM against float64 products of the same bf16-rounded inputs (every transpose the kernels use),
Linear and attention under autocast, the whole model's loss and gradients against the float32 model's, a
short training run's loss curve against the float32 run's, and the CLI trained in bfloat16.

This machine's CPU (and CI's) has no bf16 units, so every test here runs the bf16 path on emulation through
the tests-only override (precision.EMULATION_ENV=1): the results are those of a CPU with bf16 units, the
speed is not. Skipped (with the loader's reason) where MKL is not installed (pip install '.[mkl]').
Tolerances, stated once (the GPU's bf16 tests use the same):
- a bf16 product against the float64 product of the same rounded operands: 1e-5 relative (float32 sums);
- an op or the model against float32: 2e-2 relative for outputs and the loss, 5e-2 for each parameter's
  gradient (norm of the difference over the norm): bf16 keeps 8 significant bits (2^-9 relative rounding);
- a training run (2x64, B=8, T=64, 100 steps on Shakespeare): the mean loss of the last 20 steps within 0.03
  of the float32 run's, and every 10-step mean within 0.08.
Every comparison with float32 also asserts a difference above float32's rounding, so a bf16 path that
silently ran in float32 fails.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bf16_curves import training_curve, with_and_without_copies
import torch

from tinygrad_llm import precision
from tinygrad_llm import functional as F
from tinygrad_llm.kernels.cpu import mkl
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.tensor import Tensor

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(mkl.missing_reason() is not None,
                                reason=f"needs MKL's bf16 GEMM (pip install '.[mkl]'): {mkl.missing_reason()}")


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    monkeypatch.setenv(precision.EMULATION_ENV, "1")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def norm_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bits(x):
    return (precision.round_to_bfloat16(x).view(np.uint32) >> 16).astype(np.uint16)


def test_conversion_equals_torch_rounding():
    from tinygrad_llm.kernels.cpu.mixed import from_bf16, to_bf16
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(3 * 2 ** 19 + 3).astype(np.float32) * 10.0 ** rng.integers(-30, 30),
                        np.array([0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, 1 + 2 ** -8], np.float32)])
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    for a in (x[:1000], x):   # one thread; split over threads
        np.testing.assert_array_equal(to_bf16(a), theirs[:a.size])
    np.testing.assert_array_equal(from_bf16(to_bf16(x)), precision.round_to_bfloat16(x))
    wt = rng.standard_normal((5, 7)).astype(np.float32).T     # a transposed view keeps its layout
    assert to_bf16(wt).flags.f_contiguous and (to_bf16(wt) == bits(wt)).all()
    assert np.isnan(from_bf16(to_bf16(np.array([np.nan], np.float32)))).all()


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 5, 3), (300, 70, 50), (512, 384, 256)])
def test_bf16_gemm_equals_float64_product_of_rounded_inputs(monkeypatch, M, N, K, trans_a, trans_b):
    monkeypatch.setattr(mkl, "PARALLEL_MIN_FLOPS", 1 << 20)     # the largest case is split over threads
    rng = np.random.default_rng(M + N + K)
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    ab, bb = bits(a), bits(b)
    ab = np.ascontiguousarray(ab.T).T if trans_a else ab       # stored (K, M), read transposed
    bb = np.ascontiguousarray(bb.T).T if trans_b else bb
    expected = precision.round_to_bfloat16(a).astype(np.float64) @ precision.round_to_bfloat16(b).astype(np.float64)
    out = mkl.gemm(ab, bb, np.empty((M, N), np.float32))
    assert rel_err(out, expected) < 1e-5
    c = rng.standard_normal((M, N)).astype(np.float32)        # alpha and beta, as attention's products use them
    assert rel_err(mkl.gemm(ab, bb, c.copy(), alpha=0.5, beta=1.0), 0.5 * expected + c) < 1e-5
    if M * N * K > 1 << 20:                                    # the threaded split equals the one-thread call
        np.testing.assert_array_equal(out, mkl.gemm(ab, bb, np.empty((M, N), np.float32), parallel=False))


@pytest.mark.skipif(mkl.missing_reason() is None and mkl._packing is None, reason="this MKL cannot pack bf16")
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("K,N", [(1, 1), (50, 70), (384, 1152)])
def test_packed_b_serves_products_of_any_row_count(monkeypatch, K, N, trans_b):
    """One PackedB (packed once, as a weight is once a step) used by products of 1 to 1,100 rows, split
    over threads or not: each equals the float64 product of the same bf16 values, as the unpacked gemm does."""
    monkeypatch.setattr(mkl, "PARALLEL_MIN_FLOPS", 0)            # parallel=True splits every product
    rng = np.random.default_rng(K + N)
    b = rng.standard_normal((K, N)).astype(np.float32)
    bb = np.ascontiguousarray(bits(b).T).T if trans_b else bits(b)
    packed = mkl.PackedB(bb)
    assert packed.shape == (K, N)
    for M in (1, 7, 300, 1100):
        a = rng.standard_normal((M, K)).astype(np.float32)
        expected = precision.round_to_bfloat16(a).astype(np.float64) @ precision.round_to_bfloat16(b).astype(np.float64)
        for parallel in (True, False):
            out = mkl.gemm(bits(a), packed, np.full((M, N), np.nan, np.float32), parallel=parallel)
            assert rel_err(out, expected) < 1e-5
        c = rng.standard_normal((M, N)).astype(np.float32)
        assert rel_err(mkl.gemm(bits(a), packed, c.copy(), alpha=0.5, beta=1.0), 0.5 * expected + c) < 1e-5


@pytest.mark.parametrize("block_bytes", [1 << 20, 1000])
@pytest.mark.parametrize("M,N,K", [(1, 3, 5), (300, 70, 50), (1100, 96, 64), (40, 2000, 64)])
def test_gemm_with_bias_equals_gemm_then_bias_added(monkeypatch, M, N, K, block_bytes):
    """gemm(bias=b) adds b block by block after each block's product: the product followed by out += b, split
    over threads or not, with a plain or a packed right operand. Bitwise where one block holds a thread's
    rows; with blocks of a few rows MKL takes its small-product kernels, whose sums round otherwise, so
    there the float64 product of the same bf16 values is the reference."""
    monkeypatch.setattr(mkl, "BIAS_BLOCK_BYTES", block_bytes)   # 1000: blocks of a few rows, many of them
    monkeypatch.setattr(mkl, "PARALLEL_MIN_FLOPS", 0)            # parallel=True splits every product
    rng = np.random.default_rng(M + N)
    a, b = bits(rng.standard_normal((M, K)).astype(np.float32)), bits(rng.standard_normal((K, N)).astype(np.float32))
    bias = rng.standard_normal(N).astype(np.float32)
    for right in (b, mkl.packed_b(b)):
        for parallel in (True, False):
            expected = mkl.gemm(a, right, np.empty((M, N), np.float32), parallel=parallel)
            expected += bias
            got = mkl.gemm(a, right, np.full((M, N), np.nan, np.float32), parallel=parallel, bias=bias)
            if block_bytes // (4 * N) >= M:
                np.testing.assert_array_equal(got, expected)
            exact = (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64) @ (b.astype(np.uint32) << 16).view(
                np.float32).astype(np.float64) + bias
            assert rel_err(got, exact) < 1e-5


@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 9, 16, 24), (4, 64, 128, 96)])
def test_linear_under_autocast_against_rounded_and_float32(shape):
    B, T, IN, OUT = shape
    rng = np.random.default_rng(IN)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, IN), (IN, OUT), (OUT,)))
    dout = rng.standard_normal((B, T, OUT)).astype(np.float32)
    for weight in (w, np.ascontiguousarray(w.T).T):   # a plain weight; the tied LM head's transposed view
        tensors = [Tensor(a, requires_grad=True) for a in (x, weight, b)]
        with precision.autocast("bfloat16"):
            out = F.linear(*tensors)
        out.backward(Tensor(dout))
        rx, rw, rd = (precision.round_to_bfloat16(a).astype(np.float64) for a in (x, w, dout))
        assert rel_err(out.data, rx @ rw + b) < 1e-5
        assert rel_err(tensors[0].grad, rd @ rw.T) < 1e-5
        assert rel_err(tensors[1].grad, rx.reshape(-1, IN).T @ rd.reshape(-1, OUT)) < 1e-5
        assert rel_err(tensors[2].grad, dout.astype(np.float64).reshape(-1, OUT).sum(0)) < 1e-5
        assert 1e-4 < rel_err(out.data, x.astype(np.float64) @ w + b) < 2e-2
        assert all(t.grad.dtype == np.float32 for t in tensors)


def torch_attention(qkv, dout, NH, causal):
    """PyTorch's float64 attention of the packed qkv: y and dqkv (the oracle)."""
    B, T, C3 = qkv.shape
    t = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = (p.reshape(B, T, NH, -1).transpose(1, 2) for p in t.split(C3 // 3, dim=2))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    y = y.transpose(1, 2).reshape(B, T, C3 // 3)
    y.backward(torch.from_numpy(dout.astype(np.float64)))
    return y.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,NH,HS", [(2, 7, 2, 4), (2, 37, 3, 16), (4, 128, 6, 64)])
def test_self_attention_under_autocast_against_torch_and_float32(B, T, NH, HS, causal):
    rng = np.random.default_rng(T)
    qkv = rng.standard_normal((B, T, 3 * NH * HS)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * HS)).astype(np.float32)
    results = []
    for dtype in ("bfloat16", "float32"):
        t = Tensor(qkv, requires_grad=True)
        with precision.autocast(dtype):
            y = F.self_attention(t, NH, causal=causal)
        y.backward(Tensor(dout))
        results.append((y.data, t.grad))
    (y16, g16), (y32, g32) = results
    y64, g64 = torch_attention(qkv, dout, NH, causal)
    assert rel_err(y32, y64) < 1e-5 and norm_err(g32, g64) < 1e-5     # the float32 path, for scale
    assert 1e-5 < rel_err(y16, y64) < 2e-2
    assert 1e-5 < norm_err(g16, g64) < 5e-2
    assert y16.dtype == g16.dtype == np.float32


def test_self_attention_with_dropout_runs_the_float32_attention():
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 16, 24)).astype(np.float32)
    outs = []
    for dtype in ("bfloat16", "float32"):
        with precision.autocast(dtype):
            outs.append(F.self_attention(Tensor(qkv), 2, dropout_p=0.2, rng=np.random.default_rng(5)).data)
    np.testing.assert_array_equal(outs[0], outs[1])   # documented: attention dropout is not covered


def small_model(dtype, state=None):
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64, dtype=dtype)
    model = GPT(config, rng=np.random.default_rng(3))
    if state is not None:
        model.load_state_dict(state)
    return model


def test_model_loss_and_gradients_against_float32():
    m32 = small_model("float32")
    m16 = small_model("bfloat16", m32.state_dict())
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (4, 64)), rng.integers(0, 65, (4, 64))
    losses, grads = [], []
    for model in (m16, m32):
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) / losses[1] < 2e-2
    errors = {name: norm_err(grads[0][name], grads[1][name]) for name in grads[1]}
    assert max(errors.values()) < 5e-2, errors
    assert min(errors.values()) > 1e-4, errors      # every parameter's gradient went through bf16 products
    assert all(g.dtype == np.float32 for g in grads[0].values())


@pytest.mark.slow
def test_short_training_run_follows_the_float32_curve():
    text = (ROOT / "examples" / "data" / "tinyshakespeare.txt").read_text()[:200000]
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text], dtype=np.int64) % 65
    m32 = small_model("float32")
    m16 = small_model("bfloat16", m32.state_dict())
    c16, c32 = training_curve(m16, data, 100, B=8), training_curve(m32, data, 100, B=8)
    assert c32[-20:].mean() < c32[0] - 1.0             # the run learned
    assert abs(c16[-20:].mean() - c32[-20:].mean()) < 0.03
    assert np.abs((c16 - c32).reshape(-1, 10).mean(1)).max() < 0.08
    assert np.abs(c16 - c32).max() > 1e-6              # the bf16 path ran


def test_weights_converted_once_per_step_with_accumulation(monkeypatch):
    conversions = []
    original = precision.weight_copy

    def counting(w, convert, kind="bf16"):
        return original(w, lambda a: conversions.append(kind) or convert(a), kind)

    monkeypatch.setattr(precision, "weight_copy", counting)
    model = small_model("bfloat16")
    rng = np.random.default_rng(0)
    linears = 2 * 4 + 1    # per block c_attn, attn.c_proj, c_fc, mlp.c_proj; and the LM head (wte^T)
    for step in range(2):
        with precision.weight_copies():            # what train_step opens around its micro-batches
            for micro in range(2):
                _, loss = model(rng.integers(0, 65, (2, 16)), rng.integers(0, 65, (2, 16)))
                loss.backward()
        # each weight's bf16 bits, those bits packed for the forward, and packed transposed for dx
        assert sorted(set(conversions)) == ["bf16", "mkl packed", "mkl packed, transposed"]
        assert all(conversions.count(kind) == linears * (step + 1) for kind in set(conversions))


def test_train_cli_in_bfloat16_on_emulation(tmp_path):
    from tinygrad_llm.data import prepare
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    prepare(text, tmp_path / "data")
    args = ["--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"), "--n_layer=1", "--n_head=2",
            "--n_embd=16", "--block_size=16", "--batch_size=4", "--grad_accum=2", "--eval_interval=4",
            "--eval_iters=2", "--log_interval=0", "--sample_chars=0", "--dtype=bfloat16", "--max_iters=4"]
    env = dict(__import__("os").environ, **{precision.EMULATION_ENV: "1"})
    result = subprocess.run([sys.executable, "-m", "tinygrad_llm.train", *args], capture_output=True, text=True,
                            timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("L,M,N,K", [(1, 1, 1, 1), (5, 7, 3, 4), (64, 16, 40, 32)])
def test_batched_numba_loop_equals_python_loop(L, M, N, K):
    """mkl.batched's Numba loop (MKL called by address, no GIL) makes the same MKL calls as the ctypes loop:
    bitwise equal, on the strided views attention passes (rows of a packed qkv, a transposed operand)."""
    rng = np.random.default_rng(L * M)
    packed = bits(rng.standard_normal((L, M, 3 * K)).astype(np.float32))[:, :, K:2 * K]   # row stride 3K
    b = bits(rng.standard_normal((L, N, K)).astype(np.float32)).swapaxes(1, 2)            # read transposed
    c = rng.standard_normal((L, M, 2 * N)).astype(np.float32)
    outs = []
    for fn in (mkl.batched, mkl.batched_python):
        out = c.copy()
        fn(packed, b, out[:, :, N:], alpha=0.5, beta=1.0)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = np.matmul((packed.astype(np.uint32) << 16).view(np.float32).astype(np.float64),
                    (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64))
    assert rel_err(outs[0][:, :, N:], 0.5 * ref + c[:, :, N:]) < 1e-5
    np.testing.assert_array_equal(outs[0][:, :, :N], c[:, :, :N])   # only the view was written


def test_batched_over_two_leading_axes_equals_one_axis_at_a_time():
    """mkl.batched on 4-D operands (attention's batch entries and heads, each axis with its own strides: views
    of a packed (B, T, 3C) array) makes the same products as on each 3-D slice: bitwise equal."""
    rng = np.random.default_rng(7)
    B, T, NH, HS = 3, 11, 4, 8
    packed = bits(rng.standard_normal((B, T, 3 * NH * HS)).astype(np.float32)).reshape(B, T, 3, NH, HS)
    q, k = packed[:, :, 0].transpose(0, 2, 1, 3), packed[:, :, 1].transpose(0, 2, 1, 3)   # (B, NH, T, HS) views
    out = np.zeros((B, T, NH, 2 * T), np.float32).transpose(0, 2, 1, 3)[:, :, :, T:]       # strided output
    mkl.batched(q, k.swapaxes(2, 3), out, alpha=0.25)
    for b in range(B):
        ref = np.zeros((NH, T, T), np.float32)
        mkl.batched_python(q[b], k[b].swapaxes(1, 2), ref, alpha=0.25)
        np.testing.assert_array_equal(out[b], ref)
    with pytest.raises(ValueError, match="3-D or 4-D"):
        mkl.batched(q[0, 0], k[0, 0].T, out[0, 0])


@pytest.mark.parametrize("B,T,causal", [(3, 50, True), (2, 37, False), (5, 128, True)])   # 128: threads
def test_attention_over_all_heads_equals_each_head_alone(B, T, causal):
    """SelfAttention's bf16 kernel runs a work item over every head at once: its output and gradient equal,
    bitwise, those of the same kernel run on each head alone (a one-head qkv cut from the packed one)."""
    from tinygrad_llm.kernels.cpu.mixed_attention import SelfAttentionBF16Mkl
    from tinygrad_llm.tensor import Context
    rng = np.random.default_rng(T)
    NH, HS = 4, 16
    qkv = rng.standard_normal((B, T, 3 * NH * HS)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * HS)).astype(np.float32)
    ctx = Context((True,))
    y = SelfAttentionBF16Mkl.forward(ctx, qkv, NH, causal=causal, scale=HS ** -0.5)
    dqkv = SelfAttentionBF16Mkl.backward(ctx, dout)
    for h in range(NH):
        cols = [slice(part * NH * HS + h * HS, part * NH * HS + (h + 1) * HS) for part in range(3)]
        one = np.concatenate([qkv[:, :, c] for c in cols], axis=2)
        ctx1 = Context((True,))
        y1 = SelfAttentionBF16Mkl.forward(ctx1, one, 1, causal=causal, scale=HS ** -0.5)
        d1 = SelfAttentionBF16Mkl.backward(ctx1, np.ascontiguousarray(dout[:, :, h * HS:(h + 1) * HS]))
        np.testing.assert_array_equal(y[:, :, h * HS:(h + 1) * HS], y1)
        np.testing.assert_array_equal(ctx.lse[:, h], ctx1.lse[:, 0])
        for part, c in enumerate(cols):
            np.testing.assert_array_equal(dqkv[:, :, c], d1[:, :, part * HS:(part + 1) * HS])


def test_attention_exp_against_float64():
    """The attention passes' float32 exp (mixed_attention_passes.exp32, a polynomial LLVM vectorises) against
    float64 exp: within 1.5e-7 relative (NumPy's own float32 exp: 1.9e-7 on these values), exact at 0, 0 below
    -88 (exact exp: under 6e-39), inf above 88, NaN kept. Attention's exponents are <= 0."""
    from tinygrad_llm.kernels.cpu.mixed_attention_passes import exp_into
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87.3, 88, 200_000), rng.uniform(-1, 1, 100_000), -np.arange(0, 87, 1 / 64),
                        [0, -0.0, 1e-30, -1e-30]]).astype(np.float32)
    y = np.empty_like(x)
    exp_into(x, y)
    ref = np.exp(x.astype(np.float64))
    assert np.abs(y / ref - 1).max() < 1.5e-7
    special = np.array([-np.inf, -88.5, -200, 88.5, np.inf, np.nan, 0], np.float32)
    out = np.empty_like(special)
    exp_into(special, out)
    np.testing.assert_array_equal(out, [0, 0, 0, np.inf, np.inf, np.nan, 1])


@pytest.mark.parametrize("shape,parts,NH", [((2, 5, 3 * 2 * 4), 3, 2), ((3, 7, 8), 1, 2), ((4, 256, 3 * 6 * 64), 3, 6)])
def test_head_split_equals_conversion_then_head_views(shape, parts, NH):
    """Attention's one pass from the packed float32 (B, T, parts*C) to contiguous bf16 (B, NH, T, HS) arrays
    equals, bitwise, the flat conversion (mixed.to_bf16) followed by head views; (4, 256, 1152) is split
    over the threads."""
    from tinygrad_llm.kernels.cpu.mixed import to_bf16
    from tinygrad_llm.kernels.cpu.mixed_attention import _heads, _split
    rng = np.random.default_rng(shape[1])
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:4] = [np.nan, np.inf, -np.inf, 3.4e38]
    ours, ref = _split(x, parts, NH), _heads(to_bf16(x), parts, NH)
    for a, r in zip(ours, ref):
        assert a.flags.c_contiguous and a.shape == r.shape
        np.testing.assert_array_equal(a, r)


def rows_reference(s, first, r0):
    """mask, row max and exp as separate passes (attention.max_shift_rows, then the same exp32): (P numerators, max)"""
    from tinygrad_llm.kernels.cpu.attention import max_shift_rows
    from tinygrad_llm.kernels.cpu.mixed_attention_passes import exp_into
    e, m = s.copy(), np.empty(s.shape[:2], np.float32)
    max_shift_rows(e, 0, s.shape[1], s.shape[2], r0 + first, m)
    exp_into(e.reshape(-1), e.reshape(-1))
    return e, m


@pytest.mark.parametrize("r0,R,K,first", [(0, 16, 16, 1), (16, 24, 40, 1), (0, 40, 40, 40), (3, 5, 7, 1)])
def test_softmax_pass_equals_separate_passes(r0, R, K, first):
    """The forward's one row pass (softmax_bits: mask, max, exp, sum, normalise, bf16 bits, log-sum-exp) against
    the same steps as separate passes: the bits bitwise (the same float32 operations on each value), the
    log-sum-exp within 2^-23 of its terms' magnitudes (Numba's logf against NumPy's log); the row sums (float32,
    eight chains) within 1e-6 of float64 sums."""
    from tinygrad_llm.kernels.cpu.mixed import to_bf16
    from tinygrad_llm.kernels.cpu.mixed_attention_passes import row_sum, softmax_bits
    rng = np.random.default_rng(K)
    s = (rng.standard_normal((6, R, K)) * 4).astype(np.float32)
    e_ref, m = rows_reference(s, first, r0)
    seen = [min(K, r0 + i + first) for i in range(R)]
    total = np.array([[row_sum(row, n) for row, n in zip(rows, seen)] for rows in e_ref], np.float32)
    np.testing.assert_allclose(total, e_ref.astype(np.float64).sum(axis=2), rtol=1e-6)
    e, lse = np.full(s.shape, 7, np.uint16), np.zeros((6, r0 + R + 2), np.float32)
    softmax_bits(s.copy(), e, lse, r0, first)
    np.testing.assert_array_equal(e, to_bf16(e_ref * (np.float32(1) / total)[:, :, None]))
    log_total = np.log(total)   # lse = max + log(sum): the log to an ulp, the sum rounded once
    assert (np.abs(lse[:, r0:r0 + R] - (m + log_total)) <= 1.2e-7 * (np.abs(m) + np.abs(log_total))).all()
    assert not lse[:, :r0].any() and not lse[:, r0 + R:].any()   # only the block's rows


@pytest.mark.parametrize("r0,R,K,first", [(0, 16, 16, 1), (16, 24, 40, 1), (0, 40, 40, 40), (3, 5, 7, 1)])
def test_softmax_gradient_pass_equals_separate_passes(r0, R, K, first):
    """The backward's one row pass (grad_bits: P = exp(S - lse), dS = P (dP - rowsum(P dP)), the bf16 bits of
    both) against attention.shift_rows, the same exp32, attention.softmax_grad_rows and mixed.to_bf16 run one
    after the other: bitwise, and only the block's rows and keys written."""
    from tinygrad_llm.kernels.cpu.attention import shift_rows, softmax_grad_rows
    from tinygrad_llm.kernels.cpu.mixed import to_bf16
    from tinygrad_llm.kernels.cpu.mixed_attention_passes import exp_into, grad_bits
    rng = np.random.default_rng(R)
    TQ, TK = r0 + R + 3, K + 5
    s = (rng.standard_normal((6, R, K)) * 4).astype(np.float32)
    dp = rng.standard_normal(s.shape).astype(np.float32)
    lse = (rng.standard_normal((6, TQ)) + 4).astype(np.float32)
    p_ref = np.zeros((6, TQ, K), np.float32)
    p_ref[:, r0:r0 + R] = s
    shift_rows(p_ref, r0, r0 + R, K, first, lse)
    exp_into(p_ref.reshape(-1), p_ref.reshape(-1))
    ds_ref = np.zeros_like(p_ref)
    ds_ref[:, r0:r0 + R] = dp
    softmax_grad_rows(ds_ref, p_ref, r0, r0 + R, K, first)
    pb, dsb = np.zeros((6, TQ, TK), np.uint16), np.zeros((6, TQ, TK), np.uint16)
    grad_bits(s.copy(), dp.copy(), lse, pb, dsb, r0, first)
    np.testing.assert_array_equal(pb[:, r0:r0 + R, :K], to_bf16(p_ref[:, r0:r0 + R]))
    np.testing.assert_array_equal(dsb[:, r0:r0 + R, :K], to_bf16(ds_ref[:, r0:r0 + R]))
    for a in (pb, dsb):
        assert not a[:, :r0].any() and not a[:, r0 + R:].any() and not a[:, :, K:].any()


@pytest.mark.parametrize("causal", [True, False])
def test_attention_work_items_and_reused_buffers_change_nothing(monkeypatch, causal):
    """The bf16 attention split into many work items (a small CHUNK_BYTES: one batch entry each, the threads'
    scratch buffers reused, holding the last call's values) gives bitwise the results of one item per call."""
    from tinygrad_llm.kernels.cpu import mixed_attention
    from tinygrad_llm.tensor import Context
    rng = np.random.default_rng(1)
    B, T, NH, HS = 6, 128, 2, 16
    qkv = rng.standard_normal((B, T, 3 * NH * HS)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * HS)).astype(np.float32)
    results = []
    for chunk in (1 << 30, 1, 1 << 30, 1):
        monkeypatch.setattr(mixed_attention, "CHUNK_BYTES", chunk)
        ctx = Context((True,))
        y = mixed_attention.SelfAttentionBF16Mkl.forward(ctx, qkv, NH, causal=causal, scale=HS ** -0.5)
        results.append((y, ctx.lse, mixed_attention.SelfAttentionBF16Mkl.backward(ctx, dout)))
        assert np.isfinite(results[-1][2]).all()
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [1, 1000, (1 << 20) + 7])   # one thread; split over threads
def test_gelu_with_bf16_copies_equals_the_float32_kernel(n):
    """Under autocast GELU's kernel writes the bf16 copies of its output and input gradient in the same pass
    (precision.BF16_COPY_PRODUCERS): the float32 results equal elementwise.py's kernel bitwise, the copies
    equal a separate conversion of them bitwise, and each copy is taken once by the product that reads it."""
    from tinygrad_llm.kernels.cpu.elementwise import GELUNumba
    from tinygrad_llm.kernels.cpu.mixed import to_bf16
    from tinygrad_llm.kernels.cpu.mixed_elementwise import GELUBF16Numba
    from tinygrad_llm.tensor import Context
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 4).astype(np.float32).reshape(-1, 1)
    x[0, 0] = np.nan
    dout = rng.standard_normal(x.shape).astype(np.float32)
    ref = Context((True,))
    y_ref = GELUNumba.forward(ref, x, approximate="tanh")
    dx_ref = GELUNumba.backward(ref, dout)
    with precision.weight_copies():
        ctx = Context((True,))
        y = GELUBF16Numba.forward(ctx, x, approximate="tanh")
        dx = GELUBF16Numba.backward(ctx, dout)
        yb, dxb = precision.take_copy(y), precision.take_copy(dx)
        assert precision.take_copy(y) is None and precision.take_copy(y_ref) is None   # taken once; only its own
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(yb, to_bf16(y_ref))
    np.testing.assert_array_equal(dxb, to_bf16(dx_ref))
    y2 = GELUBF16Numba.forward(Context((True,)), x, approximate="tanh")   # outside a region nothing is kept
    assert precision.take_copy(y2) is None


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 64), (2200, 500)])   # one thread; split over threads
def test_layer_norm_with_bf16_copy_equals_the_float32_kernel(shape):
    """Under autocast LayerNorm's kernel writes the bf16 copy of its output in the same pass: output, saved
    statistics and gradients bitwise the float32 kernel's, the copy bitwise a separate conversion of it."""
    from tinygrad_llm.kernels.cpu.layer_norm import LayerNormNumba
    from tinygrad_llm.kernels.cpu.mixed import to_bf16
    from tinygrad_llm.kernels.cpu.mixed_elementwise import LayerNormBF16Numba
    from tinygrad_llm.tensor import Context
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    ref = Context((True, True, True))
    y_ref = LayerNormNumba.forward(ref, x, w, b)
    grads_ref = LayerNormNumba.backward(ref, dout)
    with precision.weight_copies():
        ctx = Context((True, True, True))
        y = LayerNormBF16Numba.forward(ctx, x, w, b)
        grads = LayerNormBF16Numba.backward(ctx, dout)
        yb = precision.take_copy(y)
        assert precision.take_copy(y) is None and precision.take_copy(grads[0]) is None   # dx: no copy
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(ctx.mean, ref.mean)
    np.testing.assert_array_equal(ctx.rstd, ref.rstd)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_array_equal(g, g_ref)
    np.testing.assert_array_equal(yb, to_bf16(y_ref))
    y64 = LayerNormBF16Numba.forward(Context((True,)), x.astype(np.float64))   # not float32: the float kernel
    np.testing.assert_array_equal(y64, LayerNormNumba.forward(Context((True,)), x.astype(np.float64)))


@pytest.mark.parametrize("shape", [(1, 3), (77, 130), (1100, 1000)])   # one thread; split over threads
def test_bias_gradient_and_dout_conversion_in_one_pass(shape):
    """Linear's backward sums dout's columns (db) in the pass that converts dout to bf16: the bits equal a
    separate conversion bitwise, the sums equal the float64 sums to float32 rounding and do not depend on
    whether the conversion was asked for (a producer's copy taken or not); dx and dw equal the products of
    the separately converted dout bitwise."""
    from tinygrad_llm.kernels.cpu.mixed import LinearBF16Mkl, column_sums, to_bf16
    from tinygrad_llm.tensor import Context
    rng = np.random.default_rng(shape[0])
    d = (rng.standard_normal(shape) * 10 + 3).astype(np.float32)
    d[0, 0] = np.nan if shape[0] > 1 else d[0, 0]
    sums, db = column_sums(d, True)
    sums_only, none = column_sums(d, False)
    assert none is None and sums.dtype == np.float32
    np.testing.assert_array_equal(db, to_bf16(d))
    np.testing.assert_array_equal(sums, sums_only)
    exact = d.astype(np.float64).sum(axis=0)
    scale = np.abs(d).astype(np.float64).sum(axis=0)
    finite = np.isfinite(exact)
    assert np.all(np.abs(sums[finite] - exact[finite]) <= 4e-7 * scale[finite] + 1e-30)
    assert np.array_equal(np.isnan(sums), np.isnan(exact))
    N, M, K = shape[0], shape[1], 24
    x, w = rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal((K, M)).astype(np.float32)
    dout = np.nan_to_num(d)
    ctx = Context((True, True, True))
    LinearBF16Mkl.forward(ctx, x, w, np.zeros(M, np.float32))
    dx, dw, dbias = LinearBF16Mkl.backward(ctx, dout)
    dob = to_bf16(dout)
    np.testing.assert_array_equal(dx, mkl.gemm(dob, mkl.packed_b(to_bf16(w).T), np.empty((N, K), np.float32)))
    np.testing.assert_array_equal(dw, mkl.gemm(to_bf16(x).T, dob, np.empty((K, M), np.float32)))
    np.testing.assert_array_equal(dbias, column_sums(dout, False)[0])


def test_model_with_producer_copies_equals_model_converting_itself(monkeypatch):
    """The bf16 model's loss and gradients are bitwise the same whether the products take the producers' bf16
    copies or convert their float32 outputs and gradients themselves; and they do take them (GELU's 2 and
    LayerNorm's 2 a layer, ln_f's 1)."""
    m1 = small_model("bfloat16")
    m2 = small_model("bfloat16", m1.state_dict())
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (4, 64)), rng.integers(0, 65, (4, 64))
    results, taken, sums = with_and_without_copies(m1, m2, x, y, monkeypatch)
    assert taken == 4 * m1.config.n_layer + 1 and sums == 0   # the CPU's Linear sums its own db
    assert results[0][0] == results[1][0]
    for name, g in results[0][1].items():
        np.testing.assert_array_equal(g, results[1][1][name], err_msg=name)
