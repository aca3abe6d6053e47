"""Flash attention on the GPU (kernels/cuda/flash_attention.py): equal to the NumPy-formula reference and to
the stored-probabilities CUDA path (dropout: the same mask from the same seed), to torch's
scaled_dot_product_attention, bfloat16 storage to float32, bitwise the same replayed from a CUDA graph;
and it keeps only the output and the log-sum-exp.

Skipped (cleanly, at collection) where CuPy or a GPU is missing. Tolerances (relative to the largest
element): float64 1e-10, float32 2e-4 (as tests/test_gpu.py), bfloat16 storage 2e-2 (inputs and outputs
rounded to 8 significant bits: 2^-8 = 4e-3 each, summed over a few roundings).
"""
import importlib

import numpy as np
import pytest

from tinygrad_llm import backend
from tinygrad_llm import functional as F
from tinygrad_llm.tensor import Context

from cuda_replay import eager_then_replayed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")]

TOL = {np.float64: 1e-10, np.float32: 2e-4}
BF16_TOL = 2e-2
SHAPES = [(2, 33, 3, 32), (1, 130, 2, 64), (2, 67, 1, 128), (3, 1, 2, 64), (2, 45, 2, 20)]   # B, T, NH, HS


def rel_err(a, b):
    a, b = np.asarray(backend.to_device(a, "cpu"), np.float64), np.asarray(backend.to_device(b, "cpu"), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all()
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def cuda():
    return importlib.import_module("tinygrad_llm.kernels.cuda.attention"), \
        importlib.import_module("tinygrad_llm.kernels.cuda.flash_attention")


def inputs(B, T, NH, HS, dtype, seed=0):
    import cupy as cp
    rng = np.random.default_rng(seed)
    qkv = cp.asarray((rng.standard_normal((B, T, 3 * NH * HS)) * 1.5).astype(dtype))
    dout = cp.asarray(rng.standard_normal((B, T, NH * HS)).astype(dtype))
    return qkv, dout


def self_attention(monkeypatch, flash, qkv, dout, NH, causal=True, scale=0.3, dropout_p=0.0):
    """SelfAttentionCuda forward and backward with the flash switch forced on or off."""
    attention, _ = cuda()
    monkeypatch.setattr(attention, "FLASH", "1" if flash else "0")
    ctx = Context((True,))
    y = attention.SelfAttentionCuda.forward(ctx, qkv, NH, causal=causal, scale=scale, dropout_p=dropout_p,
                                            rng=np.random.default_rng(7))
    assert ctx.flash == flash
    return y, attention.SelfAttentionCuda.backward(ctx, dout)


@pytest.fixture(autouse=True)
def cuda_core_kernels(monkeypatch):
    """These tests are the CUDA-core kernels' (flash_attention.py): float32 flash attention on heads of 32 or 64
    would otherwise take the tensor-core kernels (flash_mma.py, tests/test_flash_mma.py)."""
    monkeypatch.setattr(importlib.import_module("tinygrad_llm.kernels.cuda.flash_mma"), "MMA", "0")


@pytest.fixture(params=[True, False], ids=["dq_fused", "dq_separate"])
def fused_dq(request, monkeypatch):
    """Both ways of computing dQ (flash_attention.FUSED_DQ)."""
    monkeypatch.setattr(cuda()[1], "FUSED_DQ", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("B, T, NH, HS", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_flash_equals_the_reference(B, T, NH, HS, causal, dtype, fused_dq, monkeypatch):
    import cupy as cp
    qkv, dout = inputs(B, T, NH, HS, dtype, seed=T)
    poison = cp.full(8 * qkv.size + 4096, np.nan, dtype=dtype)   # NaN in the pool: every output must be written
    del poison
    y, dqkv = self_attention(monkeypatch, True, qkv, dout, NH, causal)
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "0")
    ctx = Context((True,))
    y_ref = F.SelfAttention.forward(ctx, qkv, NH, causal=causal, scale=0.3)
    dqkv_ref = F.SelfAttention.backward(ctx, dout)
    assert y.dtype == y_ref.dtype and dqkv.dtype == dqkv_ref.dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(dqkv, dqkv_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("B, T, NH, HS", SHAPES[:3] + SHAPES[4:], ids=str)
def test_flash_dropout_equals_the_stored_probabilities_path(B, T, NH, HS, dtype, fused_dq, monkeypatch):
    """Same seed (the generator's first draw), same hash index: the same mask as the cuBLAS path, which
    tests/test_gpu.py ties to the NumPy reference; so forward and backward agree to rounding."""
    qkv, dout = inputs(B, T, NH, HS, dtype, seed=T + 1)
    y, dqkv = self_attention(monkeypatch, True, qkv, dout, NH, dropout_p=0.3)
    y_ref, dqkv_ref = self_attention(monkeypatch, False, qkv, dout, NH, dropout_p=0.3)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(dqkv, dqkv_ref) < TOL[dtype]
    y_plain, _ = self_attention(monkeypatch, True, qkv, dout, NH)
    assert rel_err(y, y_plain) > 1e-2    # dropout did something


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("HS", [32, 64, 128])
def test_flash_equals_torch_sdpa(HS, dtype, monkeypatch):
    torch = pytest.importorskip("torch")
    B, T, NH = 2, 97, 2
    qkv, dout = inputs(B, T, NH, HS, dtype, seed=HS)
    y, dqkv = self_attention(monkeypatch, True, qkv, dout, NH, scale=HS ** -0.5)
    x = torch.tensor(qkv.get().astype(np.float64), requires_grad=True)
    q, k, v = [t.view(B, T, NH, HS).transpose(1, 2) for t in x.split(NH * HS, dim=2)]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
    out.backward(torch.tensor(dout.get().astype(np.float64)))
    assert rel_err(y, out.detach().numpy()) < TOL[dtype]
    assert rel_err(dqkv, x.grad.numpy()) < TOL[dtype]


@pytest.mark.parametrize("HS", [64, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_flash_bfloat16_storage_equals_float32(HS, dropout_p, fused_dq):
    """bfloat16 bits in, float32 arithmetic, bfloat16 bits out == the float32 kernels on the same (rounded)
    numbers, to bfloat16's rounding; against torch in float64 on those numbers too."""
    torch = pytest.importorskip("torch")
    _, flash = cuda()
    B, T, NH = 2, 150, 3
    qkv32, dout32 = inputs(B, T, NH, HS, np.float32, seed=11)
    qkv16, dout16 = flash.to_bfloat16_bits(qkv32), flash.to_bfloat16_bits(dout32)
    qkv32, dout32 = flash.from_bfloat16_bits(qkv16), flash.from_bfloat16_bits(dout16)
    results = {}
    for storage, qkv, dout in (("bfloat16", qkv16, dout16), ("float32", qkv32, dout32)):
        y, lse = flash.self_attention_forward(qkv, NH, True, 0.125, 99, dropout_p, storage=storage)
        dqkv = flash.self_attention_backward(qkv, y, lse, dout, NH, True, 0.125, 99, dropout_p, storage=storage)
        assert y.dtype == qkv.dtype and dqkv.dtype == qkv.dtype and lse.dtype == np.float32
        results[storage] = [flash.from_bfloat16_bits(a) if storage == "bfloat16" else a for a in (y, dqkv)]
    for a, b in zip(results["bfloat16"], results["float32"]):
        assert rel_err(a, b) < BF16_TOL
    if dropout_p == 0:
        x = torch.tensor(qkv32.get().astype(np.float64), requires_grad=True)
        q, k, v = [t.view(B, T, NH, HS).transpose(1, 2) for t in x.split(NH * HS, dim=2)]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125)
        out = out.transpose(1, 2).reshape(B, T, -1)
        out.backward(torch.tensor(dout32.get().astype(np.float64)))
        assert rel_err(results["bfloat16"][0], out.detach().numpy()) < BF16_TOL
        assert rel_err(results["bfloat16"][1], x.grad.numpy()) < BF16_TOL


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_flash_on_split_heads_equals_the_reference(dtype, dropout_p, fused_dq, monkeypatch):
    """ScaledDotProductAttentionCuda on (B, NH, T, HS) q, k, v: flash == the cuBLAS path (same mask)."""
    import cupy as cp
    attention, _ = cuda()
    rng = np.random.default_rng(5)
    q, k, v = (cp.asarray(rng.standard_normal((2, 3, 71, 32)).astype(dtype)) for _ in range(3))
    dout = cp.asarray(rng.standard_normal((2, 3, 71, 32)).astype(dtype))
    got = []
    for flash in ("1", "0"):
        monkeypatch.setattr(attention, "FLASH", flash)
        ctx = Context((True, True, True, False))
        y = attention.ScaledDotProductAttentionCuda.forward(ctx, q, k, v, None, causal=True, scale=0.4,
                                                            dropout_p=dropout_p, rng=np.random.default_rng(3))
        assert ctx.flash == (flash == "1")
        got.append((y, *attention.ScaledDotProductAttentionCuda.backward(ctx, dout)[:3]))
    for a, b in zip(*got):
        assert rel_err(a, b) < TOL[dtype]


def test_flash_replays_from_a_cuda_graph(fused_dq):
    """Launches only, into buffers made beforehand: the captured forward + backward replays the eager results,
    bit for bit with dQ separate (every sum in a fixed order), to rounding with the atomic dQ sums."""
    import cupy as cp
    _, flash = cuda()
    B, T, NH, HS = 2, 100, 2, 64
    qkv, dout = inputs(B, T, NH, HS, np.float32, seed=3)
    layout = flash.Layout.packed("float32", B, T, NH, HS)
    C, size = NH * HS, 4
    y, dqkv, work = cp.empty_like(dout), cp.empty_like(qkv), cp.empty(B * NH * T * HS, np.float32)
    lse, D = cp.empty(B * NH * T, np.float32), cp.empty(B * NH * T, np.float32)
    p, g = qkv.data.ptr, dqkv.data.ptr

    def step():
        flash.forward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, lse.data.ptr, True, 0.2, 5, 0.1)
        flash.backward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, dout.data.ptr, lse.data.ptr, D.data.ptr,
                       g, g + C * size, g + 2 * C * size, True, 0.2, 5, 0.1, work.data.ptr)

    eager = eager_then_replayed(step, (y, dqkv))
    assert bool((y == eager[0]).all())
    if fused_dq:
        assert rel_err(dqkv, eager[1]) < 1e-6
    else:
        assert bool((dqkv == eager[1]).all())


def test_flash_keeps_only_the_output_and_the_log_sum_exp():
    import cupy as cp
    _, flash = cuda()
    qkv, _ = inputs(4, 512, 2, 64, np.float32)
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    y, lse = flash.self_attention_forward(qkv, 2, True, 0.125, 0, 0.0)
    assert pool.used_bytes() - before <= y.nbytes + lse.nbytes + 1024   # the pool rounds to 512 bytes
    assert lse.shape == (4 * 2 * 512,)


def test_flash_switch_and_rule(monkeypatch):
    attention, flash = cuda()
    monkeypatch.setattr(attention, "FLASH", "auto")
    assert attention.use_flash(4, 6, attention.FLASH_MIN_T, 64, np.float32)
    assert not attention.use_flash(64, 6, attention.FLASH_MIN_T // 2, 64, np.float32)
    assert not attention.use_flash(1, 1, attention.FLASH_MIN_T, 128, np.float32)         # the cuBLAS path was faster
    assert attention.use_flash(4096, 64, attention.FLASH_MIN_T // 2, 128, np.float32)    # but it would not fit
    assert not attention.use_flash(1, 1, 10 ** 6, flash.MAX_HEAD_SIZE + 1, np.float32)
    monkeypatch.setattr(attention, "FLASH", "1")
    assert attention.use_flash(1, 1, 8, 64, np.float32)
    monkeypatch.setattr(attention, "FLASH", "0")
    assert not attention.use_flash(8, 6, 2048, 64, np.float32)
    monkeypatch.setattr(attention, "FLASH", "yes")
    with pytest.raises(ValueError, match="TINYGRAD_LLM_FLASH must be auto, 1 or 0"):
        attention.use_flash(1, 1, 8, 64, np.float32)
    with pytest.raises(ValueError, match="storage"):
        flash.Layout.packed("float16", 1, 8, 1, 64)
    with pytest.raises(ValueError, match="head size"):
        flash.Layout.packed("float32", 1, 8, 1, 256)


def test_flash_dropout_seed_from_device_memory():
    """seed_ptr set: the kernels hash with HEADER's dropout_seed(base in device memory, seed) (what a replayed
    CUDA graph reads anew each step); the same mask as that mixed seed handed over from the host."""
    import cupy as cp
    _, flash = cuda()
    qkv, dout = inputs(1, 70, 2, 32, np.float32, seed=9)
    base, k, mask64 = 0x123456789ABCDEF, 3, (1 << 64) - 1
    z = (base + (k + 1) * 0xD1B54A32D192ED03) & mask64
    z = ((z ^ (z >> 32)) * 0xBF58476D1CE4E5B9) & mask64
    mixed = (z ^ (z >> 29)) & 0x7FFFFFFFFFFFFFFF
    words = cp.asarray(np.array([base], np.uint64))
    y_dev, lse_dev = flash.self_attention_forward(qkv, 2, True, 0.2, k, 0.3, seed_ptr=words.data.ptr)
    y_host, lse_host = flash.self_attention_forward(qkv, 2, True, 0.2, mixed, 0.3)
    y_other, _ = flash.self_attention_forward(qkv, 2, True, 0.2, k, 0.3)
    assert bool((y_dev == y_host).all()) and not bool((y_dev == y_other).all())
    g_dev = flash.self_attention_backward(qkv, y_dev, lse_dev, dout, 2, True, 0.2, k, 0.3, seed_ptr=words.data.ptr)
    g_host = flash.self_attention_backward(qkv, y_host, lse_host, dout, 2, True, 0.2, mixed, 0.3)
    assert rel_err(g_dev, g_host) < 1e-6
