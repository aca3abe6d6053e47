"""LoRA: the lora_linear op against torch autograd and its composite twin, gradcheck, apply_lora / merge_lora."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import torch

import tinygrad_llm.composite as C
import tinygrad_llm.functional as F
from tinygrad_llm.gradcheck import gradcheck
from tinygrad_llm.lora import LoRAEmbedding, LoRALinear, LoRALMHead, apply_lora, lora_linears, lora_modules, merge_lora
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.nn import Embedding, Linear
from tinygrad_llm.tensor import Context, Tensor


def _inputs(rng, lead=(2, 3), IN=5, OUT=4, R=2, dtype="float64"):
    return [rng.standard_normal(s).astype(dtype) for s in (lead + (IN,), (IN, OUT), (OUT,), (IN, R), (R, OUT))]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lora_linear_equals_torch_autograd_of_x_w_plus_scaled_x_a_b(dtype):
    rng = np.random.default_rng(0)
    arrays = _inputs(rng, lead=(3, 7), IN=6, OUT=5, R=3, dtype=dtype)
    alpha, rank = 6.0, 3
    ours = [Tensor(a, requires_grad=True) for a in arrays]
    out = F.lora_linear(*ours, scale=alpha / rank)
    dout = rng.standard_normal(out.shape).astype(dtype)
    (out * Tensor(dout)).sum().backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    x, w, b, A, B = theirs
    ref = x @ w + b + (alpha / rank) * (x @ A @ B)
    (ref * torch.tensor(dout)).sum().backward()
    tol = dict(atol=1e-9, rtol=0) if dtype == "float64" else dict(atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    for name, o, t in zip("x w b A B".split(), ours, theirs):
        np.testing.assert_allclose(o.grad, t.grad.numpy(), err_msg=name, **tol)


def test_lora_linear_fused_equals_composite_without_bias():
    rng = np.random.default_rng(1)
    x, w, _, A, B = _inputs(rng)
    grads = []
    for fn in (F.lora_linear, C.lora_linear):
        ts = [Tensor(a, requires_grad=True) for a in (x, w, A, B)]
        out = fn(ts[0], ts[1], None, ts[2], ts[3], scale=0.7)
        (out * out).sum().backward()
        grads.append([out.numpy()] + [t.grad for t in ts])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-12, rtol=1e-12)


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**16),
       st.floats(0.1, 4.0), st.booleans())
def test_gradcheck_lora_linear(N, IN, OUT, R, seed, scale, bias):
    rng = np.random.default_rng(seed)
    x, w, b, A, B = _inputs(rng, lead=(N,), IN=IN, OUT=OUT, R=R)
    if bias:
        assert gradcheck(lambda x, w, b, A, B: F.lora_linear(x, w, b, A, B, scale=scale), [x, w, b, A, B]).passed
    else:
        assert gradcheck(lambda x, w, A, B: F.lora_linear(x, w, None, A, B, scale=scale), [x, w, A, B]).passed


def test_backward_computes_only_the_gradients_asked_for():
    rng = np.random.default_rng(2)
    x, w, b, A, B = _inputs(rng)
    ctx = Context((False, False, False, True, True))
    out = F.LoRALinear.forward(ctx, x, w, b, A, B, scale=2.0)
    dx, dw, db, dA, dB = F.LoRALinear.backward(ctx, np.ones_like(out))
    assert dx is None and dw is None and db is None and dA.shape == A.shape and dB.shape == B.shape
    # through the autograd: frozen w and b get no gradient at all
    ts = [Tensor(x, requires_grad=True), Tensor(w), Tensor(b), Tensor(A, requires_grad=True), Tensor(B, requires_grad=True)]
    F.lora_linear(*ts, scale=2.0).sum().backward()
    assert ts[1].grad is None and ts[2].grad is None and ts[0].grad is not None


def test_lora_linear_bad_shapes_raise():
    rng = np.random.default_rng(3)
    x, w, b, A, B = [Tensor(a) for a in _inputs(rng)]
    with pytest.raises(ValueError, match="A .* and B .* do not fit"):
        F.lora_linear(x, w, b, B, A)
    with pytest.raises(ValueError, match="expected x"):
        F.lora_linear(w, x, b, A, B)


def _tiny_gpt(dtype="float64", seed=0):
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype=dtype)
    return GPT(config, rng=np.random.default_rng(seed))


def test_apply_lora_names_shapes_freezing_and_identity_at_start():
    model = _tiny_gpt()
    idx = np.random.default_rng(0).integers(0, 11, (2, 6))
    before = model(idx)[0].numpy()
    apply_lora(model, rank=2, alpha=4)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 2 * 2 * 4        # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in names)
    params = dict(model.named_parameters())
    assert params["transformer.h.0.attn.c_attn.lora_A"].shape == (8, 2)
    assert params["transformer.h.0.attn.c_attn.lora_B"].shape == (2, 24)
    assert params["transformer.h.1.mlp.c_fc.lora_A"].shape == (8, 2)
    assert not params["transformer.h.0.attn.c_attn.lora_B"].data.any()       # B starts at zero
    np.testing.assert_array_equal(model(idx)[0].numpy(), before)              # so the model starts as the base
    _, loss = model(idx, idx)
    loss.backward()
    frozen = [model.transformer.wte.weight, model.transformer.h[0].attn.c_attn.weight, model.transformer.ln_f.weight]
    assert all(t.grad is None and not t.requires_grad for t in frozen)
    assert all(p.grad is not None for p in model.parameters())


def test_merge_lora_folds_the_adapters_same_logits():
    model = _tiny_gpt()
    apply_lora(model, rank=3, alpha=6, targets=("c_attn", "c_fc"))
    rng = np.random.default_rng(5)
    for _, m in lora_linears(model):
        m.lora_B.data[...] = rng.standard_normal(m.lora_B.shape)   # as if trained
    idx = rng.integers(0, 11, (2, 7))
    adapted = model(idx)[0].numpy()
    merge_lora(model)
    assert not lora_linears(model) and all(type(m) is Linear for n, m in model.named_modules() if n.endswith(("c_attn", "c_fc")))
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters()) and len(model.parameters()) == len(_tiny_gpt().parameters())
    np.testing.assert_allclose(model(idx)[0].numpy(), adapted, atol=1e-12, rtol=1e-10)


def test_apply_lora_bad_arguments_change_nothing():
    model = _tiny_gpt()
    for kwargs, match in [(dict(rank=0, alpha=1), "rank"), (dict(rank=2, alpha=-1), "alpha"),
                          (dict(rank=2, alpha=1, targets=("nope",)), "no Linear"), (dict(rank=99, alpha=1), "exceeds")]:
        with pytest.raises(ValueError, match=match):
            apply_lora(model, **kwargs)
        assert all(p.requires_grad for p in model.parameters()) and not lora_linears(model)
    apply_lora(model, 2, 2)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, 2, 2)
    merge_lora(model)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(model)


def test_lora_training_step_changes_only_the_adapters():
    from tinygrad_llm.optim import AdamW
    model = _tiny_gpt("float32")
    apply_lora(model, 2, 4)
    frozen = {id(t): t.data.copy() for _, m in model.named_modules() for t in vars(m).values()
              if isinstance(t, Tensor) and not t.requires_grad}
    opt = AdamW(model.parameters(), lr=1e-2)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    for _ in range(2):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for _, m in model.named_modules():
        for t in vars(m).values():
            if isinstance(t, Tensor) and id(t) in frozen:
                np.testing.assert_array_equal(t.data, frozen[id(t)])
    assert any(m.lora_B.data.any() for _, m in lora_linears(model))
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)


# ---- adapters on embedding tables --------------------------------------------------------------------

@pytest.mark.parametrize("train_table", [False, True])
def test_lora_embedding_equals_torch_autograd_of_table_plus_scaled_a_b(train_table):
    rng = np.random.default_rng(3)
    V, Cn, R, scale = 9, 6, 3, 2.5
    idx = rng.integers(0, V, (4, 5))
    idx[0, :3] = 2                                             # a row looked up more than once: gradients add up
    W, A, B = (rng.standard_normal(s) for s in ((V, Cn), (V, R), (R, Cn)))
    m = Embedding(V, Cn, rng=rng, dtype="float64")
    m.weight = Tensor(W, requires_grad=train_table)
    m.lora_A, m.lora_B = Tensor(A, requires_grad=True), Tensor(B, requires_grad=True)
    m.lora_scale, m.__class__ = scale, LoRAEmbedding
    dout = rng.standard_normal((4, 5, Cn))
    for out in (m(idx), m._prechecked(idx)):                   # the checked and the model's fast path
        for t in (m.weight, m.lora_A, m.lora_B):
            t.grad = None
        (out * Tensor(dout)).sum().backward()
        tW, tA, tB = (torch.tensor(a, requires_grad=True) for a in (W, A, B))
        ti = torch.tensor(idx)
        ref = tW[ti] + scale * (tA[ti] @ tB)                    # torch autograd of the table plus scale A B, looked up
        (ref * torch.tensor(dout)).sum().backward()
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=1e-12, rtol=0)
        np.testing.assert_allclose(m.lora_A.grad, tA.grad.numpy(), atol=1e-9, rtol=0)
        np.testing.assert_allclose(m.lora_B.grad, tB.grad.numpy(), atol=1e-9, rtol=0)
        if train_table:
            np.testing.assert_allclose(m.weight.grad, tW.grad.numpy(), atol=1e-9, rtol=0)
        else:
            assert m.weight.grad is None


@given(st.integers(1, 3), st.integers(2, 6), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**16), st.floats(0.1, 4.0))
def test_gradcheck_lora_embedding(N, V, Cn, R, seed, scale):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (N, 3))
    W, A, B = (rng.standard_normal(s) for s in ((V, Cn), (V, R), (R, Cn)))

    def f(W, A, B):
        return F.embedding(idx, W) + F.linear(F.embedding(idx, A), B) * scale

    assert gradcheck(f, [W, A, B]).passed


def _set_adapters(model, seed):
    rng = np.random.default_rng(seed)
    for _, m in lora_modules(model):
        m.lora_B.data[...] = rng.standard_normal(m.lora_B.shape)   # as if trained


def test_lora_on_tied_embeddings_the_head_follows_and_merge_keeps_the_logits():
    model = _tiny_gpt()
    idx = np.random.default_rng(4).integers(0, 11, (2, 7))
    base = model(idx)[0].numpy()
    apply_lora(model, rank=2, alpha=3, targets=("c_fc", "wte", "wpe"))
    assert isinstance(model.transformer.wte, LoRAEmbedding) and isinstance(model.transformer.wpe, LoRAEmbedding)
    assert isinstance(model.lm_head, LoRALMHead) and model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["transformer.wte.lora_A", "transformer.wte.lora_B", "transformer.wpe.lora_A", "transformer.wpe.lora_B"]
    assert not any(n.startswith("lm_head.") for n in model.state_dict())   # the head's adapter is the table's, named once
    params = dict(model.named_parameters())
    assert params["transformer.wte.lora_A"].shape == (11, 2) and params["transformer.wpe.lora_B"].shape == (2, 8)
    np.testing.assert_array_equal(model(idx)[0].numpy(), base)               # B = 0: the base model
    _set_adapters(model, 5)
    adapted = model(idx)[0].numpy()
    # what the adapted model must compute: the tables W + scale A B, the head multiplying by the same sum
    e = model.transformer.wte
    table = e.weight.data + e.lora_scale * e.lora_A.data @ e.lora_B.data
    assert not np.allclose(adapted, base)
    merge_lora(model)
    assert type(model.transformer.wte) is Embedding and type(model.lm_head).__name__ == "LMHead"
    assert model.lm_head.weight is model.transformer.wte.weight
    np.testing.assert_allclose(model.transformer.wte.weight.data, table, atol=1e-15, rtol=0)
    np.testing.assert_allclose(model(idx)[0].numpy(), adapted, atol=1e-12, rtol=1e-10)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_lora_on_tied_embeddings_gradients_match_finite_differences():
    model = _tiny_gpt()
    apply_lora(model, rank=2, alpha=3, targets=("wte",))
    _set_adapters(model, 6)
    idx = np.random.default_rng(7).integers(0, 11, (2, 6))
    _, loss = model(idx, idx)
    loss.backward()
    e, eps = model.transformer.wte, 1e-6
    for t in (e.lora_A, e.lora_B):
        for pos in [(0, 0), (t.shape[0] - 1, 1), (1, 0)]:
            keep = t.data[pos]
            t.data[pos] = keep + eps
            up = model(idx, idx)[1].item()
            t.data[pos] = keep - eps
            down = model(idx, idx)[1].item()
            t.data[pos] = keep
            np.testing.assert_allclose(t.grad[pos], (up - down) / (2 * eps), atol=1e-7, rtol=1e-5)
    assert model.transformer.wte.weight.grad is None            # the table stays frozen


def test_lora_on_a_classifiers_embeddings_saves_loads_and_merges():
    from tinygrad_llm.finetune import GPTClassifier
    clf = GPTClassifier.from_gpt(_tiny_gpt(), 3, rng=np.random.default_rng(1))
    idx, last = np.random.default_rng(2).integers(0, 11, (3, 5)), np.array([4, 2, 0])
    apply_lora(clf, rank=2, alpha=2, targets=("c_attn", "wte"))
    assert clf.lm_head is None and isinstance(clf.transformer.wte, LoRAEmbedding)
    _set_adapters(clf, 8)
    adapted = clf(idx, last).numpy()
    saved = clf.state_dict()
    assert set(saved) == {f"transformer.{n}.{ab}" for n in ("wte", "h.0.attn.c_attn", "h.1.attn.c_attn") for ab in ("lora_A", "lora_B")}
    again = GPTClassifier.from_gpt(_tiny_gpt(), 3, rng=np.random.default_rng(1))
    apply_lora(again, rank=2, alpha=2, targets=("c_attn", "wte"))
    again.load_state_dict(saved)
    np.testing.assert_array_equal(again(idx, last).numpy(), adapted)
    merge_lora(again)
    np.testing.assert_allclose(again(idx, last).numpy(), adapted, atol=1e-12, rtol=1e-10)
