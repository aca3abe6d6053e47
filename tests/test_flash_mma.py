"""Flash attention on the tensor cores (kernels/cuda/flash_mma.py), bf16 and TF32: against torch's attention in
float64 on the same inputs, against the cuBLAS path it replaces (SelfAttentionBF16Cuda under bf16 autocast,
SelfAttentionCuda with TF32 on: the same dropout mask from the same seed), bf16 outputs against float32
outputs, the dropout seed read from device memory, a CUDA graph's replay, and what it keeps.

Skipped (cleanly, at collection) where CuPy or a GPU is missing. Tolerances, relative to the largest element:
bf16 2e-2, as tests/test_flash_attention.py's bf16 storage (P, Pd and dS rounded to bf16, 2^-9 relative each,
as the operands of their products; a bf16 output adds one rounding); TF32 5e-3 (q, k, v, dy, P, Pd, dS rounded
to tf32's 10-bit fraction, 2^-11 each, summed over 64-term products); 3xTF32 ("float32") 5e-5, float32's
level: the rounding of float32 sums over a few hundred terms (2^-24 each), far under TF32's errors on the same
inputs (test_3xtf32_is_float32_accurate checks both sides).
"""
import importlib

import numpy as np
import pytest

from tinygrad_llm import backend
from tinygrad_llm.tensor import Context

from cuda_replay import eager_then_replayed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")]

TOL = {"bfloat16": 2e-2, "tf32": 5e-3, "float32": 5e-5}
SHAPES = [(2, 33, 3, 32), (1, 130, 2, 64), (3, 1, 2, 64), (2, 200, 2, 64), (1, 64, 1, 32)]   # B, T, NH, HS
KINDS = ["bfloat16", "tf32", "float32"]   # flash_mma.KINDS: bf16 bits; float32 in TF32 products; float32 in 3xTF32


def modules():
    return importlib.import_module("tinygrad_llm.kernels.cuda.flash_mma"), \
        importlib.import_module("tinygrad_llm.kernels.cuda.mixed")


def rel_err(a, b):
    a, b = np.asarray(backend.to_device(a, "cpu"), np.float64), np.asarray(backend.to_device(b, "cpu"), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all()
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def inputs(B, T, NH, HS, kind, seed=0):
    """(qkv float32 (on the bf16 grid for kind bfloat16), what the kernels take (bf16 bits or that float32),
    dout float32)."""
    import cupy as cp
    _, mixed = modules()
    rng = np.random.default_rng(seed)
    qkv = cp.asarray((rng.standard_normal((B, T, 3 * NH * HS)) * 1.5).astype(np.float32))
    dout = cp.asarray(rng.standard_normal((B, T, NH * HS)).astype(np.float32))
    if kind != "bfloat16":
        return qkv, qkv, dout
    bits = mixed.to_bf16(qkv)
    return mixed.from_bf16(bits), bits, dout


def torch_reference(qkv, dout, NH, causal, scale):
    torch = pytest.importorskip("torch")
    B, T, C3 = qkv.shape
    HS = C3 // 3 // NH
    x = torch.tensor(qkv.get().astype(np.float64), requires_grad=True)
    q, k, v = [t.view(B, T, NH, HS).transpose(1, 2) for t in x.split(NH * HS, dim=2)]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    out = out.transpose(1, 2).reshape(B, T, -1)
    out.backward(torch.tensor(dout.get().astype(np.float64)))
    return out.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B, T, NH, HS", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mma_flash_equals_torch(B, T, NH, HS, causal, kind):
    import cupy as cp
    mma, _ = modules()
    qkv, taken, dout = inputs(B, T, NH, HS, kind, seed=T + HS)
    poison = cp.full(8 * qkv.size + 4096, np.nan, dtype=np.float32)   # NaN in the pool: every output must be written
    del poison
    assert mma.packed_supported(taken, NH, kind=kind)
    y, lse = mma.self_attention_forward(taken, NH, causal, 0.3, 0, 0.0, kind=kind)
    dqkv = mma.self_attention_backward(taken, y, lse, dout, NH, causal, 0.3, 0, 0.0, kind=kind)
    assert y.dtype == dqkv.dtype == lse.dtype == np.float32
    y_ref, dqkv_ref = torch_reference(qkv, dout, NH, causal, 0.3)
    assert rel_err(y, y_ref) < TOL[kind]
    assert rel_err(dqkv, dqkv_ref) < TOL[kind]
    q, k = (qkv.get().astype(np.float64).reshape(B, T, 3, NH, HS)[:, :, i] for i in (0, 1))
    s = np.einsum("bthd,bshd->bhts", q, k) * 0.3
    if causal:
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    lse_ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    assert np.abs(lse.get().reshape(B, NH, T) - lse_ref).max() < TOL[kind] * max(1.0, np.abs(lse_ref).max())


def _op(kind, ctx, qkv, NH, **kw):
    """The op the kernels serve for `kind`: bf16 autocast's attention, or float32 attention (TF32 on for tf32;
    flash attention chosen for float32)."""
    attention = importlib.import_module("tinygrad_llm.kernels.cuda.attention")
    _, mixed = modules()
    op = mixed.SelfAttentionBF16Cuda if kind == "bfloat16" else attention.SelfAttentionCuda
    return op, op.forward(ctx, qkv, NH, causal=True, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("B, T, NH, HS", [(2, 97, 3, 64), (1, 150, 2, 32)], ids=str)
def test_mma_path_equals_the_cublas_path(B, T, NH, HS, dropout_p, kind, monkeypatch):
    """The op with MMA on and off: one seed (the generator's first draw), one hash index, one mask."""
    mma, _ = modules()
    attention = importlib.import_module("tinygrad_llm.kernels.cuda.attention")
    monkeypatch.setattr(attention, "FLASH", "1" if kind == "float32" else "0")   # float32: against the CUDA-core flash
    qkv, _, dout = inputs(B, T, NH, HS, kind, seed=5)
    results = {}
    try:
        backend.set_tf32(kind == "tf32")
        for mode in ("1", "0"):
            monkeypatch.setattr(mma, "MMA", mode)
            ctx = Context((True,))
            op, y = _op(kind, ctx, qkv, NH, scale=HS ** -0.5, dropout_p=dropout_p, rng=np.random.default_rng(3))
            assert bool(ctx.mma) == (mode == "1")
            results[mode] = (y, op.backward(ctx, dout))
        if dropout_p:
            monkeypatch.setattr(mma, "MMA", "1")
            _, y_plain = _op(kind, Context((True,)), qkv, NH, scale=HS ** -0.5)
    finally:
        backend.set_tf32(False)
    for a, b in zip(results["1"], results["0"]):
        assert rel_err(a, b) < TOL[kind]
    if dropout_p:
        assert rel_err(results["1"][0], y_plain) > 5e-2   # dropout did something


def test_float32_attention_takes_them_where_flash_is_chosen(monkeypatch):
    """Without TF32, float32 attention takes the 3xTF32 kernels only where use_flash picks flash attention."""
    attention = importlib.import_module("tinygrad_llm.kernels.cuda.attention")
    qkv, _, _ = inputs(2, 64, 2, 64, "float32")
    for flash, kind in (("auto", None), ("1", "float32"), ("0", None)):
        monkeypatch.setattr(attention, "FLASH", flash)
        ctx = Context((True,))
        attention.SelfAttentionCuda.forward(ctx, qkv, 2)
        assert ctx.mma == kind and not modules()[0].tf32_on()
    monkeypatch.setattr(attention, "FLASH", "1")
    ctx = Context((True,))
    attention.SelfAttentionCuda.forward(ctx, qkv.astype(np.float64), 2)   # float64: the CUDA-core kernels
    assert ctx.mma is None and ctx.flash


def test_3xtf32_is_float32_accurate():
    """The float32 kind's error against float64 is within float32's bound for these sums, (HS + T) 2^-24 of the
    largest element (2.2e-5 here: every product sums HS terms, every row T), as the CUDA-core kernels' (float32
    FMA) is, and at least ten times under the tf32 kind's on the same inputs: the three products do recover
    float32's accuracy. (Measured on the H200: 3.8e-6 against the FMA kernels' 8.3e-7; the tensor cores'
    float32 sums do not round as FMA does.)"""
    mma, _ = modules()
    flash = importlib.import_module("tinygrad_llm.kernels.cuda.flash_attention")
    B, T, NH, HS = 2, 300, 2, 64
    qkv, _, dout = inputs(B, T, NH, HS, "float32", seed=21)
    y_ref, g_ref = torch_reference(qkv, dout, NH, True, 0.125)
    errors = {}
    for kind in ("float32", "tf32"):
        y, lse = mma.self_attention_forward(qkv, NH, True, 0.125, 0, 0.0, kind=kind)
        g = mma.self_attention_backward(qkv, y, lse, dout, NH, True, 0.125, 0, 0.0, kind=kind)
        errors[kind] = max(rel_err(y, y_ref), rel_err(g, g_ref))
    y, lse = flash.self_attention_forward(qkv, NH, True, 0.125, 0, 0.0)
    g = flash.self_attention_backward(qkv, y, lse, dout, NH, True, 0.125, 0, 0.0)
    fma = max(rel_err(y, y_ref), rel_err(g, g_ref))
    bound = (HS + T) * 2.0 ** -24
    assert fma < bound and errors["float32"] < bound
    assert errors["tf32"] > 10 * errors["float32"]


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_bf16_outputs_equal_float32_outputs(dropout_p):
    """output="bfloat16" (dy in, y, dq, dk, dv out as bf16 bits) == the float32 outputs to bf16 rounding."""
    mma, mixed = modules()
    B, T, NH, HS = 2, 140, 3, 64
    _, bits, dout = inputs(B, T, NH, HS, "bfloat16", seed=11)
    dout = mixed.from_bf16(mixed.to_bf16(dout))
    y32, lse32 = mma.self_attention_forward(bits, NH, True, 0.125, 99, dropout_p)
    g32 = mma.self_attention_backward(bits, y32, lse32, dout, NH, True, 0.125, 99, dropout_p)
    y16, lse16 = mma.self_attention_forward(bits, NH, True, 0.125, 99, dropout_p, output="bfloat16")
    g16 = mma.self_attention_backward(bits, y16, lse16, mixed.to_bf16(dout), NH, True, 0.125, 99, dropout_p,
                                      output="bfloat16")
    assert y16.dtype == g16.dtype == np.uint16
    assert bool((lse16 == lse32).all())   # the same float32 arithmetic up to the outputs
    assert rel_err(mixed.from_bf16(y16), y32) < TOL["bfloat16"]
    assert rel_err(mixed.from_bf16(g16), g32) < TOL["bfloat16"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, T, NH, HS", [(2, 200, 3, 64), (1, 64, 2, 32), (3, 1, 2, 64)], ids=str)
def test_forward_writes_y_bf16_copy(B, T, NH, HS, causal):
    """y_bf16: the bf16 kernel writes to_bf16(y)'s bits beside y, and y and lse are those of a run without it, bit
    for bit; anything but a (B, T, C) uint16 array for the bf16 kind's float32 y is refused."""
    import cupy as cp
    mma, mixed = modules()
    _, bits, _ = inputs(B, T, NH, HS, "bfloat16", seed=B + T)
    want_y, want_lse = mma.self_attention_forward(bits, NH, causal, 0.125, 3, 0.2)
    yb = cp.full((B, T, NH * HS), 0xABCD, dtype=np.uint16)
    y, lse = mma.self_attention_forward(bits, NH, causal, 0.125, 3, 0.2, y_bf16=yb)
    assert bool((y == want_y).all()) and bool((lse == want_lse).all())
    np.testing.assert_array_equal(yb.get(), mixed.to_bf16(y).get())
    with pytest.raises(ValueError, match="y_bf16"):
        mma.self_attention_forward(bits, NH, causal, 0.125, 3, 0.2, output="bfloat16", y_bf16=yb)
    with pytest.raises(ValueError, match="y_bf16"):
        mma.self_attention_forward(bits, NH, causal, 0.125, 3, 0.2, y_bf16=yb[:, :, :-1])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B, T, NH, HS", [(2, 100, 2, 64), (1, 200, 3, 32), (1, 64, 1, 64)], ids=str)
def test_stored_mask_is_the_hash_and_backward_reads_it(B, T, NH, HS, causal):
    """keep_bits: the forward stores the dropout mask, each element's bit where flash_mma_common.py's keep_block
    comment puts it, equal to the hash (test_dropout_hash's NumPy rule) on every element the attention sees; the
    backward that reads it gives dk and dv bit for bit and dq to rounding (atomic sums) as the one that hashes, in
    float32 and bf16 outputs, and one block's bits flipped changes them (so the bits are what it reads)."""
    from test_dropout_hash import keep_reference
    mma, mixed = modules()
    _, bits, dout = inputs(B, T, NH, HS, "bfloat16", seed=T)
    seed, p = 0x5EED_1234_ABCD_0077, 0.3
    keep = mma.keep_bits_for(bits, NH, p)
    assert keep is not None and keep.size == B * NH * (-(-T // 64)) ** 2 * 128 and keep.dtype == np.uint32
    keep[...] = 0xFFFFFFFF
    y, lse = mma.self_attention_forward(bits, NH, causal, 0.2, seed, p, keep_bits=keep)
    y_hash, lse_hash = mma.self_attention_forward(bits, NH, causal, 0.2, seed, p)
    assert bool((y == y_hash).all()) and bool((lse == lse_hash).all())
    NT = -(-T // 64)   # words [bh, query tile, key tile, warp w, g, t]; bit 4 j + e of a word: the element
    # (query 16 w + g + 8 (e / 2), key 8 j + 2 t + e % 2) of its tile pair
    bh, qt, kt, w, g, t, j, e = np.meshgrid(*(np.arange(n) for n in (B * NH, NT, NT, 4, 8, 4, 8, 4)), indexing="ij")
    q, k = qt * 64 + 16 * w + g + 8 * (e >> 1), kt * 64 + 8 * j + 2 * t + (e & 1)
    seen = (q < T) & (k < T) & ((k <= q) if causal else True)
    words = keep.get().reshape(B * NH, NT, NT, 4, 8, 4)[..., None, None]
    stored = (words >> (4 * j + e).astype(np.uint32)) & 1
    want = keep_reference(seed, (bh * T + q) * T + k, p)
    np.testing.assert_array_equal(stored[seen].astype(bool), want[seen])
    assert 0.6 < want[seen].mean() < 0.8
    for output in ("float32", "bfloat16"):
        dy = dout if output == "float32" else mixed.to_bf16(dout)
        yy = y if output == "float32" else mixed.to_bf16(y)
        read = mma.self_attention_backward(bits, yy, lse, dy, NH, causal, 0.2, seed, p, output=output, keep_bits=keep)
        hashed = mma.self_attention_backward(bits, yy, lse, dy, NH, causal, 0.2, seed, p, output=output)
        C = NH * HS
        assert bool((read[..., C:] == hashed[..., C:]).all())   # dk, dv
        widen = (lambda a: a) if output == "float32" else mixed.from_bf16
        assert rel_err(widen(read[..., :C]), widen(hashed[..., :C])) < (1e-6 if output == "float32" else 1e-2)
    flipped = keep.copy()
    flipped[:128] ^= np.uint32(0xFFFFFFFF)   # (b, h) 0's first tile pair: its queries 0-63 against keys 0-63
    read = mma.self_attention_backward(bits, y, lse, dout, NH, causal, 0.2, seed, p, keep_bits=keep)
    changed = mma.self_attention_backward(bits, y, lse, dout, NH, causal, 0.2, seed, p, keep_bits=flipped)
    assert not bool((changed[0, :64, C:] == read[0, :64, C:]).all())   # those keys' dk, dv
    assert bool((changed[0, 64:, C:] == read[0, 64:, C:]).all()) and bool((changed[1:, :, C:] == read[1:, :, C:]).all())


def test_keep_bits_policy_and_refusals():
    """Stored only with dropout and where the mask is at most a third of the bf16 qkv's bytes (T <= 16 HS);
    an array of another size or dtype, or one without dropout, is refused before anything runs."""
    import cupy as cp
    mma, _ = modules()
    _, bits, dout = inputs(1, 96, 2, 32, "bfloat16", seed=1)
    assert mma.keep_bits_for(bits, 2, 0.0) is None and mma.keep_bits_for(bits, 2, 1.0) is None
    assert mma.keep_bits_for(bits, 2, 0.1).size == mma.keep_bits_words(1, 2, 96) == 2 * 4 * 128
    long = cp.zeros((1, 16 * 32 + 1, 3 * 64), dtype=np.uint16)
    assert mma.keep_bits_for(long, 2, 0.1) is None and mma.keep_bits_for(long[:, :-1], 2, 0.1) is not None
    keep = mma.keep_bits_for(bits, 2, 0.1)
    for bad in (keep[:-4], keep.view(np.int32), cp.zeros(keep.size, dtype=np.uint64)):
        with pytest.raises(ValueError, match="keep_bits"):
            mma.self_attention_forward(bits, 2, True, 0.2, 1, 0.1, keep_bits=bad)
    with pytest.raises(ValueError, match="keep_bits is for the bf16 kind with dropout"):
        mma.self_attention_forward(bits, 2, True, 0.2, 1, 0.0, keep_bits=keep)
    y, lse = mma.self_attention_forward(bits, 2, True, 0.2, 1, 0.1, keep_bits=keep)
    with pytest.raises(ValueError, match="keep_bits"):
        mma.self_attention_backward(bits, y, lse, dout, 2, True, 0.2, 1, 0.1, keep_bits=keep[:-4])


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_seed_from_device_memory(kind):
    """seed_ptr set: the kernels hash with HEADER's dropout_seed(base in device memory, seed), the same mask as
    that mixed seed handed over from the host (what a replayed CUDA graph reads anew each step)."""
    import cupy as cp
    mma, _ = modules()
    _, taken, dout = inputs(1, 70, 2, 32, kind, seed=9)
    base, k, mask64 = 0x123456789ABCDEF, 3, (1 << 64) - 1
    z = (base + (k + 1) * 0xD1B54A32D192ED03) & mask64
    z = ((z ^ (z >> 32)) * 0xBF58476D1CE4E5B9) & mask64
    mixed_seed = (z ^ (z >> 29)) & 0x7FFFFFFFFFFFFFFF
    words = cp.asarray(np.array([base], np.uint64))
    y_dev, lse_dev = mma.self_attention_forward(taken, 2, True, 0.2, k, 0.3, seed_ptr=words.data.ptr, kind=kind)
    y_host, lse_host = mma.self_attention_forward(taken, 2, True, 0.2, mixed_seed, 0.3, kind=kind)
    y_other, _ = mma.self_attention_forward(taken, 2, True, 0.2, k, 0.3, kind=kind)
    assert bool((y_dev == y_host).all()) and not bool((y_dev == y_other).all())
    g_dev = mma.self_attention_backward(taken, y_dev, lse_dev, dout, 2, True, 0.2, k, 0.3, seed_ptr=words.data.ptr,
                                        kind=kind)
    g_host = mma.self_attention_backward(taken, y_host, lse_host, dout, 2, True, 0.2, mixed_seed, 0.3, kind=kind)
    assert rel_err(g_dev, g_host) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_replays_from_a_cuda_graph(kind):
    """Launches only, into buffers made beforehand: the captured forward + backward replays the eager results
    (y bit for bit; dq to rounding: its sums are atomic, in no fixed order)."""
    import cupy as cp
    mma, _ = modules()
    B, T, NH, HS = 2, 100, 2, 64
    _, taken, dout = inputs(B, T, NH, HS, kind, seed=3)
    layout = mma._layout(*mma._packed(B, T, NH * HS, NH))
    C, size = NH * HS, taken.dtype.itemsize
    y, dqkv, work = cp.empty_like(dout), cp.empty(taken.shape, np.float32), cp.empty(B * NH * T * HS, np.float32)
    lse, D = cp.empty(B * NH * T, np.float32), cp.empty(2 * B * NH * T, np.float32)   # bf16: D, then lse in base 2
    dy_bf16 = cp.empty(dout.shape, np.uint16)   # the bf16 kernels' copy of the float32 dout
    p, g = taken.data.ptr, dqkv.data.ptr

    def step(copy=dy_bf16.data.ptr):
        mma.forward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, lse.data.ptr, True, 0.2, 5, 0.1, kind=kind)
        mma.backward(layout, p, p + C * size, p + 2 * C * size, y.data.ptr, dout.data.ptr, lse.data.ptr, D.data.ptr,
                     g, g + 4 * C, g + 8 * C, work.data.ptr, True, 0.2, 5, 0.1, kind=kind, dy_bf16=copy)

    if kind == "bfloat16":   # no scratch for dout's bf16 bits, or one off a 16-byte boundary: refused
        for bad in (0, dy_bf16.data.ptr + 8):
            with pytest.raises(ValueError, match="dy_bf16"):
                step(bad)
    eager = eager_then_replayed(step, (y, dqkv))
    assert bool((y == eager[0]).all())
    assert rel_err(dqkv, eager[1]) < 1e-6


def test_keeps_no_square_array_and_the_switch(monkeypatch):
    import cupy as cp
    mma, _ = modules()
    _, bits, _ = inputs(4, 512, 2, 64, "bfloat16")
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    y, lse = mma.self_attention_forward(bits, 2, True, 0.125, 0, 0.0)
    assert pool.used_bytes() - before <= y.nbytes + lse.nbytes + 1024   # the pool rounds to 512 bytes
    assert not mma.packed_supported(bits[..., :3 * 2 * 48].copy(), 2)     # head size 48: not taken
    assert not mma.packed_supported(bits, 1)                              # head size 128: not taken
    assert not mma.packed_supported(bits.astype(np.float64), 2)           # float64: never
    assert not mma.supported(64, output="bfloat16", kind="tf32")          # TF32 writes float32 only
    assert not mma.packed_supported(bits, 2, kind="tf32")                 # bf16 bits are no tf32 input
    monkeypatch.setattr(mma, "MMA", "0")
    assert not mma.enabled()
    monkeypatch.setattr(mma, "MMA", "yes")
    with pytest.raises(ValueError, match="TINYGRAD_LLM_FLASH_MMA must be 1 or 0"):
        mma.enabled()
