"""bf16 mixed precision on the GPU (precision.py's policy, kernels/cuda/mixed.py): the conversion kernel, the
bf16 GEMMs against float32 products of the same bf16-rounded inputs, attention, the whole model's loss and
gradients against the float32 model's, and a short training run's loss curve against the float32 run's.

Skipped (cleanly, at collection) where CuPy or a GPU is missing. Tolerances, stated once:
- a bf16 product against the float64 product of the same rounded operands: 1e-5 relative (float32 sums);
- an op or the model against float32: 2e-2 relative for outputs and the loss, 5e-2 for each parameter's
  gradient (norm of the difference over the norm): bf16 keeps 8 significant bits (2^-9 relative rounding),
  and each product's error reaches the gradients through every layer behind it;
- a training run: the mean loss of the last 20 of 150 steps within 0.03 of the float32 run's, and every
  10-step mean within 0.08.
Every comparison with float32 also asserts a difference above float32's rounding, so a bf16 path that
silently ran in float32 fails.
"""
import numpy as np
import pytest
from bf16_curves import training_curve, with_and_without_copies

from tinygrad_llm import backend, precision
from tinygrad_llm import functional as F
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.tensor import Tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")]


def rel_err(a, b):
    a, b = np.asarray(backend.to_device(a, "cpu"), np.float64), np.asarray(backend.to_device(b, "cpu"), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def norm_err(a, b):
    a, b = np.asarray(backend.to_device(a, "cpu"), np.float64), np.asarray(backend.to_device(b, "cpu"), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bits(x):
    """The bf16 bits of round_to_bfloat16(x) (the host reference)."""
    return (precision.round_to_bfloat16(x).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 1027, 3 * 4096 + 2])
def test_conversion_kernel_equals_host_rounding(n):
    import cupy as cp

    from tinygrad_llm.kernels.cuda import mixed
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n + 1) * 10.0 ** rng.integers(-20, 20, n + 1)).astype(np.float32)
    x[: min(n, 4)] = np.array([np.inf, -np.inf, 3.4e38, 1.0 + 2 ** -8], np.float32)[: min(n, 4)]
    d = cp.asarray(x)
    np.testing.assert_array_equal(mixed.to_bf16(d[:n]).get(), bits(x[:n]))      # 16-byte aligned: vector kernel
    np.testing.assert_array_equal(mixed.to_bf16(d[1:]).get(), bits(x[1:]))      # misaligned: elementwise kernel
    np.testing.assert_array_equal(mixed.from_bf16(mixed.to_bf16(d)).get(), precision.round_to_bfloat16(x))
    m = cp.asarray(rng.standard_normal((7, 5)).astype(np.float32))
    np.testing.assert_array_equal(mixed.to_bf16(m.T).get(), bits(m.T.get()))   # a transposed view


@pytest.mark.parametrize("trans_a,trans_b,bias", [(False, False, True), (False, False, False), (False, True, False),
                                                  (True, False, False), (True, True, True)])
@pytest.mark.parametrize("M,N,K", [(256, 384, 1152), (33, 65, 70)])
def test_bf16_gemm_equals_float32_product_of_rounded_inputs(M, N, K, trans_a, trans_b, bias):
    import cupy as cp

    from tinygrad_llm.kernels.cuda import gemm_bf16, mixed
    rng = np.random.default_rng(M + N + K)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    bvec = rng.standard_normal(N).astype(np.float32) if bias else None
    ab, bb = mixed.to_bf16(cp.asarray(a)), mixed.to_bf16(cp.asarray(b))
    c = cp.full((M, N), np.nan, dtype=np.float32)
    served = gemm_bf16.bf16_matmul(M, N, K, ab.data.ptr, a.shape[1], bb.data.ptr, b.shape[1], c.data.ptr, N,
                                   trans_a, trans_b, None if bias is False else cp.asarray(bvec))
    assert served   # cuBLASLt took it (not the fallback)
    ra, rb = precision.round_to_bfloat16(a).astype(np.float64), precision.round_to_bfloat16(b).astype(np.float64)
    ref = (ra.T if trans_a else ra) @ (rb.T if trans_b else rb) + (0 if bvec is None else bvec)
    assert rel_err(c, ref) < 1e-5
    plain = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b) + (0 if bvec is None else bvec)
    assert rel_err(c, plain) > 1e-4   # the operands were rounded


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 64, 384, 6)])
def test_linear_under_autocast_against_rounded_and_float32(shape):
    B, T, IN, OUT = shape
    rng = np.random.default_rng(IN)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, IN), (IN, OUT), (OUT,)))
    dout = rng.standard_normal((B, T, OUT)).astype(np.float32)
    tensors = [Tensor(backend.to_device(a, "cuda"), requires_grad=True) for a in (x, w, b)]
    with precision.autocast("bfloat16"):
        out = F.linear(*tensors)
    out.backward(Tensor(backend.to_device(dout, "cuda")))
    rx, rw, rd = (precision.round_to_bfloat16(a).astype(np.float64) for a in (x, w, dout))
    assert rel_err(out.data, rx @ rw + b) < 1e-5
    assert rel_err(tensors[0].grad, rd @ rw.T) < 1e-5
    assert rel_err(tensors[1].grad, rx.reshape(-1, IN).T @ rd.reshape(-1, OUT)) < 1e-5
    assert rel_err(tensors[2].grad, dout.astype(np.float64).reshape(-1, OUT).sum(0)) < 1e-5   # db: float32 sum
    assert 1e-4 < rel_err(out.data, x.astype(np.float64) @ w + b) < 2e-2
    assert all(t.grad.dtype == np.float32 for t in tensors)


@pytest.mark.parametrize("mma", ["1", "0"], ids=["tensor_core_flash", "cublas"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("B,T,NH,HS", [(2, 7, 2, 4), (4, 128, 6, 64)])
def test_self_attention_under_autocast_against_float32(B, T, NH, HS, dropout_p, mma, monkeypatch):
    """(The head size 4 is never the tensor-core flash kernels': both ids run the cuBLAS path there.)"""
    import importlib
    monkeypatch.setattr(importlib.import_module("tinygrad_llm.kernels.cuda.flash_mma"), "MMA", mma)
    rng = np.random.default_rng(T)
    qkv = rng.standard_normal((B, T, 3 * NH * HS)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * HS)).astype(np.float32)
    results = []
    for dtype in ("bfloat16", "float32"):
        t = Tensor(backend.to_device(qkv, "cuda"), requires_grad=True)
        with precision.autocast(dtype):
            y = F.self_attention(t, NH, dropout_p=dropout_p, rng=np.random.default_rng(5))  # the same mask
        y.backward(Tensor(backend.to_device(dout, "cuda")))
        results.append((y.data, t.grad))
    (y16, g16), (y32, g32) = results
    assert 1e-5 < rel_err(y16, y32) < 2e-2
    assert 1e-5 < norm_err(g16, g32) < 5e-2
    assert g16.dtype == np.float32


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_self_attention_under_autocast_the_same_whatever_it_keeps(causal, monkeypatch):
    """attention.SAVE ("lse": S recomputed from the same bf16 q k^T; "p": Pd redrawn from P; "p+pd": both
    kept) changes what backward reads, not the result: the bf16 outputs and gradients agree to a bf16
    rounding of a few of Pd's elements (2^-8), far closer than to float32's."""
    import importlib
    attention = importlib.import_module("tinygrad_llm.kernels.cuda.attention")
    monkeypatch.setattr(attention, "FLASH", "0")
    monkeypatch.setattr(importlib.import_module("tinygrad_llm.kernels.cuda.flash_mma"), "MMA", "0")   # the cuBLAS path
    B, T, NH, HS = 4, 128, 6, 64
    rng = np.random.default_rng(9)
    qkv = rng.standard_normal((B, T, 3 * NH * HS)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * HS)).astype(np.float32)
    results = {}
    for save in ("lse", "p", "p+pd"):
        monkeypatch.setattr(attention, "SAVE", save)
        t = Tensor(backend.to_device(qkv, "cuda"), requires_grad=True)
        with precision.autocast("bfloat16"):
            y = F.self_attention(t, NH, causal=causal, dropout_p=0.2, rng=np.random.default_rng(5))
        y.backward(Tensor(backend.to_device(dout, "cuda")))
        results[save] = (y.data, t.grad)
    y_ref, g_ref = results["p+pd"]
    for save in ("lse", "p"):
        y, g = results[save]
        assert rel_err(y, y_ref) < 1e-2 and norm_err(g, g_ref) < 5e-3, save
    assert rel_err(results["p"][0], y_ref) == 0.0   # the same Pd: "p" redraws exactly what "p+pd" kept


def small_model(dtype, state=None, dropout=0.0, n_head=4):
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=n_head, n_embd=64, dtype=dtype, dropout=dropout)
    model = GPT(config, rng=np.random.default_rng(3))
    if state is not None:
        model.load_state_dict(state)
    return model.to("cuda")


def test_model_loss_and_gradients_against_float32():
    m32 = small_model("float32")
    m16 = small_model("bfloat16", {k: backend.to_device(v, "cpu") for k, v in m32.state_dict().items()})
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (4, 64)), rng.integers(0, 65, (4, 64))
    losses, grads = [], []
    for model in (m16, m32):
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    # at initialisation the logits are small and the loss sits near log(65) whatever the rounding: the loss
    # agrees far inside the tolerance, and the gradients show that the bf16 path ran
    assert abs(losses[0] - losses[1]) / losses[1] < 2e-2
    errors = {name: norm_err(grads[0][name], grads[1][name]) for name in grads[1]}
    print(f"\nloss {losses[0]:.6f} / {losses[1]:.6f}; gradient errors: largest {max(errors.values()):.2e} "
          f"({max(errors, key=errors.get)}), smallest {min(errors.values()):.2e}")
    assert max(errors.values()) < 5e-2, errors
    assert max(errors.values()) > 1e-4
    assert all(g.dtype == np.float32 for g in grads[0].values())


@pytest.mark.parametrize("shape", [(4, 64, 96), (3, 7, 40), (5, 13)])
def test_layer_norm_and_gelu_write_the_bf16_copy_of_their_output(shape):
    """Under autocast (precision.BF16_COPY_PRODUCERS) LayerNorm's and GELU's CUDA kernels give the float32
    kernels' outputs bit for bit, and offer bf16(output)'s bits (to_bf16's) for the next product to take, once;
    outside a weight_copies region nothing is kept, and float64 offers nothing."""
    import cupy as cp

    from tinygrad_llm.kernels.cuda import mixed, mixed_elementwise
    from tinygrad_llm.kernels.cuda.elementwise import GELUCuda
    from tinygrad_llm.kernels.cuda.layer_norm import LayerNormCuda
    from tinygrad_llm.tensor import Context
    rng = np.random.default_rng(sum(shape))
    x = cp.asarray(rng.standard_normal(shape).astype(np.float32) * 3)
    w, b = (cp.asarray(rng.standard_normal(shape[-1]).astype(np.float32)) for _ in range(2))
    cases = [(mixed_elementwise.LayerNormBF16Cuda, LayerNormCuda, (x, w, b), {}),
             (mixed_elementwise.GELUBF16Cuda, GELUCuda, (x,), {"approximate": "tanh"})]
    for kernel, float_kernel, args, kwargs in cases:
        want = float_kernel.forward(Context((True,) * len(args)), *args, **kwargs)
        with precision.weight_copies():
            out = kernel.forward(Context((True,) * len(args)), *args, **kwargs)
            copy = precision.take_copy(out)
            assert precision.take_copy(out) is None and precision.take_copy(want) is None
        assert bool((out == want).all()), kernel.__name__
        np.testing.assert_array_equal(copy.get(), mixed.to_bf16(want).get())
        assert precision.take_copy(kernel.forward(Context((True,) * len(args)), *args, **kwargs)) is None
        with precision.weight_copies():
            out64 = kernel.forward(Context((True,) * len(args)), *(a.astype(np.float64) for a in args), **kwargs)
            assert precision.take_copy(out64) is None and out64.dtype == np.float64


@pytest.mark.parametrize("shape", [(4, 64, 96), (3, 7, 40), (5, 13), (2, 300, 1536)])
def test_gelu_and_dropout_add_backward_offer_the_copy_and_column_sums_of_their_gradient(shape):
    """Under autocast GELU's backward (tanh form) and DropoutAdd's give the float32 kernels' gradients bit for
    bit, and offer, once, bf16(gradient)'s bits (to_bf16's) and its column sums (column_sums' of the gradient,
    bit for bit: the bias gradient the next product would have summed); DropoutAdd's dx is dout itself.
    Rows that do not split into 16-byte lanes (13 columns) run the float32 kernels and offer nothing, as does a
    backward outside a weight_copies region (precision.collecting)."""
    import cupy as cp

    from tinygrad_llm.kernels.cuda import columns, mixed, mixed_elementwise
    from tinygrad_llm.kernels.cuda.elementwise import DropoutAddCuda, GELUCuda
    from tinygrad_llm.tensor import Context
    rng = np.random.default_rng(sum(shape))
    x, y, dout = (cp.asarray(rng.standard_normal(shape).astype(np.float32) * 3) for _ in range(3))
    M = shape[-1]

    def gelu(kernel):
        ctx = Context((True,))
        kernel.forward(ctx, x, approximate="tanh")
        return (kernel.backward(ctx, dout),)

    def dropout_add(kernel):
        ctx = Context((True, True))
        kernel.forward(ctx, x, y, p=0.2, rng=np.random.default_rng(7))
        return kernel.backward(ctx, dout)

    for run, kernel, float_kernel in ((gelu, mixed_elementwise.GELUBF16Cuda, GELUCuda),
                                      (dropout_add, mixed_elementwise.DropoutAddBF16Cuda, DropoutAddCuda)):
        want = run(float_kernel)
        with precision.weight_copies():
            got = run(kernel)
            copy, sums = precision.take_copy(got[-1], sums=True)
            assert precision.take_copy(got[-1], sums=True) == (None, None)
        for g, w in zip(got, want):
            assert g.shape == shape and g.dtype == np.float32 and bool((g == w).all()), kernel.__name__
        if len(got) == 2:
            assert got[0] is dout
            if dout.size > 10000:
                assert 0.75 < float((got[1] != 0).mean()) < 0.85   # the mask dropped about a fifth
        if M % 4:   # rows not in 16-byte lanes: the float32 kernel, nothing offered
            assert copy is None and sums is None
            continue
        np.testing.assert_array_equal(copy.get(), mixed.to_bf16(want[-1]).get())
        np.testing.assert_array_equal(sums.get(), columns.column_sums(want[-1].reshape(-1, M)).get())
        host = want[-1].get().astype(np.float64).reshape(-1, M).sum(axis=0)
        assert rel_err(sums, host) < 1e-5                  # and those sums are the gradient's, summed in float64
        outside = run(kernel)                              # no weight_copies region: the float32 kernels, no offer
        assert precision.take_copy(outside[-1]) is None and all(bool((g == w).all()) for g, w in zip(outside, want))


def test_dropout_add_under_autocast_keeps_the_ops_masks_with_kernels_off(monkeypatch):
    """TINYGRAD_LLM_KERNELS=0 gives DropoutAdd's own masks (its generator's draws) under bf16 autocast too: the
    bf16 kernel class defers to the op, forward and backward."""
    import cupy as cp

    from tinygrad_llm import functional as F
    from tinygrad_llm.kernels.cuda import mixed_elementwise
    from tinygrad_llm.tensor import Context
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "0")
    rng = np.random.default_rng(2)
    x, y, dout = (cp.asarray(rng.standard_normal((3, 40, 64)).astype(np.float32)) for _ in range(3))
    ctx, ref = Context((True, True)), Context((True, True))
    with precision.weight_copies():
        got = mixed_elementwise.DropoutAddBF16Cuda.forward(ctx, x, y, p=0.3, rng=np.random.default_rng(4))
        grads = mixed_elementwise.DropoutAddBF16Cuda.backward(ctx, dout)
        assert precision.take_copy(grads[1]) is None
    want = F.DropoutAdd.forward(ref, x, y, p=0.3, rng=np.random.default_rng(4))
    assert bool((got == want).all())
    for g, w in zip(grads, F.DropoutAdd.backward(ref, dout)):
        assert bool((g == w).all())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_with_producer_copies_equals_model_converting_itself(dropout, monkeypatch):
    """The bf16 model's loss and gradients on the GPU are bitwise the same whether its products take the
    producers' bf16 copies (and a gradient's column sums) or convert the float32 arrays and sum the bias
    gradients themselves, and they do take them. Attention on its cuBLAS path here: the flash kernels add dQ atomically, in an
    order that changes from run to run; and the embeddings' gradients (CuPy's scatter-add, atomic too) within
    float32 rounding of the order only."""
    from tinygrad_llm.kernels.cuda import flash_mma
    monkeypatch.setattr(flash_mma, "MMA", "0")
    m1 = small_model("bfloat16", dropout=dropout)
    m2 = small_model("bfloat16", {k: backend.to_device(v, "cpu") for k, v in m1.state_dict().items()}, dropout)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (4, 64)), rng.integers(0, 65, (4, 64))
    results, taken, sums = with_and_without_copies(m1, m2, x, y, monkeypatch, seed=5)
    # a layer: LayerNorm's 2 and GELU's 1 forward; GELU's 1 and, with dropout, DropoutAdd's 2 backward, each
    # backward's with its column sums (c_fc's and the two c_proj's bias gradients)
    assert taken == (4 + (2 if dropout else 0)) * m1.config.n_layer + 1
    assert sums == (1 + (2 if dropout else 0)) * m1.config.n_layer
    assert results[0][0] == results[1][0]
    for name, g in results[0][1].items():
        if name.startswith(("transformer.wte", "transformer.wpe")):
            assert norm_err(g, results[1][1][name]) < 1e-6, name
        else:
            np.testing.assert_array_equal(g, results[1][1][name], err_msg=name)


def test_flash_attention_offers_its_output_copy(monkeypatch):
    """With attention on the flash kernels (the default), the forward also offers y's bf16 copy, which c_proj
    takes: one more copy a layer; the loss is the same bits as without any offer (the forward has no
    atomics; backward's dQ sums do, so the gradients are compared to float32 rounding of the order only)."""
    m1 = small_model("bfloat16", dropout=0.2, n_head=2)   # heads of 32: the flash kernels take them
    m2 = small_model("bfloat16", {k: backend.to_device(v, "cpu") for k, v in m1.state_dict().items()}, 0.2, 2)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 65, (4, 64)), rng.integers(0, 65, (4, 64))
    results, taken, sums = with_and_without_copies(m1, m2, x, y, monkeypatch, seed=6)
    assert taken == 7 * m1.config.n_layer + 1 and sums == 3 * m1.config.n_layer
    assert results[0][0] == results[1][0]
    for name, g in results[0][1].items():
        assert norm_err(g, results[1][1][name]) < 1e-3, name


def test_short_training_run_follows_the_float32_curve():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt").read_text()[:200000]
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text], dtype=np.int64) % 65
    m32 = small_model("float32")
    m16 = small_model("bfloat16", {k: backend.to_device(v, "cpu") for k, v in m32.state_dict().items()})
    c16, c32 = training_curve(m16, data, 150, B=16), training_curve(m32, data, 150, B=16)
    print(f"\nbf16 vs float32 loss: first {c16[0]:.4f} / {c32[0]:.4f}, last-20 mean {c16[-20:].mean():.4f} / "
          f"{c32[-20:].mean():.4f}, max 10-step-mean gap {np.abs(c16 - c32).reshape(-1, 10).mean(1).max():.4f}")
    assert c32[-20:].mean() < c32[0] - 1.0             # the run learned
    assert abs(c16[-20:].mean() - c32[-20:].mean()) < 0.03
    assert np.abs((c16 - c32).reshape(-1, 10).mean(1)).max() < 0.08
    assert np.abs(c16 - c32).max() > 1e-6              # the bf16 path ran


def test_weights_converted_once_per_step_with_accumulation(monkeypatch):
    conversions = []
    original = precision.weight_copy

    def counting(w, convert):
        return original(w, lambda a: conversions.append(a.shape) or convert(a))

    monkeypatch.setattr(precision, "weight_copy", counting)
    model = small_model("bfloat16")
    rng = np.random.default_rng(0)
    linears = 2 * 4 + 1    # per block c_attn, attn.c_proj, c_fc, mlp.c_proj; and the LM head (wte^T)
    for step in range(3):
        with precision.weight_copies():            # what train_step opens around its micro-batches
            for micro in range(2):
                _, loss = model(rng.integers(0, 65, (2, 16)), rng.integers(0, 65, (2, 16)))
                loss.backward()
        assert len(conversions) == linears * (step + 1)
    _, loss = model(rng.integers(0, 65, (2, 16)), rng.integers(0, 65, (2, 16)))   # no region: one per forward
    assert len(conversions) == linears * 4


def test_train_function_in_bfloat16_on_cuda_resumes(tmp_path):
    from tinygrad_llm.data import prepare
    from tinygrad_llm.train import TrainConfig, train
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    prepare(text, tmp_path / "data")
    common = dict(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), n_layer=1, n_head=2, n_embd=16,
                  block_size=16, batch_size=4, grad_accum=2, eval_interval=5, eval_iters=2, log_interval=0,
                  sample_chars=20, device="cuda", dtype="bfloat16", dropout=0.1, lr_decay_iters=10)
    first = train(TrainConfig(max_iters=5, **common))
    assert np.isfinite(first["best_val_loss"]) and first["model"].transformer.wte.weight.dtype == np.float32
    resumed = train(TrainConfig(max_iters=10, init_from="resume", **common))
    assert resumed["iters"] == 10 and np.isfinite(resumed["final_val_loss"])
