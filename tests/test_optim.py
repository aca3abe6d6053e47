"""Optimizers against torch.optim, the cosine schedule, clipping, and gradient accumulation."""
import json
import math

import numpy as np
import pytest

from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import SGD, AdamW, clip_grad_norm, cosine_lr, param_groups
from tinygrad_llm.tensor import Tensor

torch = pytest.importorskip("torch")

SHAPES = [(4, 3), (3,), (2, 5, 2)]


def twin_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ours = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in arrays]
    return ours, theirs


def set_grads(ours, theirs, step, dtype):
    rng = np.random.default_rng(1000 + step)
    for p, t in zip(ours, theirs):
        g = rng.standard_normal(p.shape).astype(dtype)
        p.grad = g.copy()
        t.grad = torch.tensor(g.copy())


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 1e-5)])
def test_adamw_matches_torch_with_groups_and_a_schedule(dtype, rtol):
    ours, theirs = twin_params(dtype)
    opt = AdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0, "lr": 3e-3}],
                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    t_opt = torch.optim.AdamW([{"params": theirs[:1], "weight_decay": 0.1},
                               {"params": theirs[1:], "weight_decay": 0.0, "lr": 3e-3}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(8):
        lr = cosine_lr(step, 1e-2, 1e-3, 2, 8)
        opt.param_groups[0]["lr"] = t_opt.param_groups[0]["lr"] = lr
        set_grads(ours, theirs, step, dtype)
        opt.step()
        t_opt.step()
        for p, t in zip(ours, theirs):
            np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=rtol, atol=rtol * 1e-2)
            assert p.data.dtype == np.dtype(dtype)


def test_adamw_defaults_are_torchs():
    ours, theirs = twin_params("float64")
    opt, t_opt = AdamW(ours), torch.optim.AdamW(theirs)
    group = opt.param_groups[0]
    t_group = t_opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == \
        (t_group["lr"], t_group["betas"], t_group["eps"], t_group["weight_decay"])
    for step in range(3):
        set_grads(ours, theirs, step, "float64")
        opt.step()
        t_opt.step()
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12)


def test_adamw_skips_params_without_grad_and_dedupes_tied_ones():
    ours, theirs = twin_params("float64")
    opt = AdamW([ours[0], ours[1], ours[0]], lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2
    t_opt = torch.optim.AdamW(theirs[:2], lr=0.1)
    set_grads(ours, theirs, 0, "float64")
    ours[1].grad, theirs[1].grad = None, None
    before = ours[1].data.copy()
    opt.step()
    t_opt.step()
    np.testing.assert_array_equal(ours[1].data, before)
    np.testing.assert_allclose(ours[0].data, theirs[0].detach().numpy(), rtol=1e-12)


def test_adamw_state_dict_resumes_exactly_and_is_plain():
    ours, _ = twin_params("float64")
    resumed, _ = twin_params("float64")
    opt = AdamW(ours, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        for p in ours:
            p.grad = np.random.default_rng(step).standard_normal(p.shape)
        opt.step()
        if step == 2:
            saved = opt.state_dict()
            snapshot = [p.data.copy() for p in ours]
    # the state is numpy arrays and plain numbers: the numbers survive JSON
    assert all(isinstance(v, np.ndarray) for s in saved["state"].values() for k, v in s.items() if k != "step")
    json.dumps({"groups": saved["param_groups"], "steps": {str(i): s["step"] for i, s in saved["state"].items()}})
    for p, a in zip(resumed, snapshot):
        p.data[...] = a
    opt2 = AdamW(resumed, lr=123.0)
    opt2.load_state_dict({"param_groups": saved["param_groups"],
                          "state": {str(i): s for i, s in saved["state"].items()}})
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    for step in range(3, 5):
        for p in resumed:
            p.grad = np.random.default_rng(step).standard_normal(p.shape)
        opt2.step()
    for a, b in zip(ours, resumed):
        np.testing.assert_array_equal(a.data, b.data)


def test_adamw_load_state_dict_rejects_a_mismatch():
    ours, _ = twin_params("float64")
    opt = AdamW(ours)
    for p in ours:
        p.grad = np.ones(p.shape)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="parameters"):
        AdamW(ours[:2]).load_state_dict(saved)
    saved["state"][0]["exp_avg"] = np.zeros((9,))
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has shape \(9,\)"):
        AdamW(ours).load_state_dict(saved)


def test_param_groups_decay_matrices_and_embeddings_only():
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16), rng=np.random.default_rng(0))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert "transformer.h.0.attn.c_attn.weight" in decayed
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.parameters())
    assert sum(p is model.lm_head.weight for p in decay["params"]) == 1  # tied: once


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01)])
def test_sgd_matches_torch(momentum, weight_decay):
    ours, theirs = twin_params("float64")
    opt = SGD(ours, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    t_opt = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for step in range(5):
        set_grads(ours, theirs, step, "float64")
        opt.step()
        t_opt.step()
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12)


def test_cosine_lr_values():
    kw = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000)
    assert cosine_lr(0, **kw) == pytest.approx(1e-5)
    assert cosine_lr(49, **kw) == pytest.approx(5e-4)
    assert cosine_lr(99, **kw) == pytest.approx(1e-3)
    assert cosine_lr(100, **kw) == pytest.approx(1e-3)
    assert cosine_lr(1050, **kw) == pytest.approx(5.5e-4)
    assert cosine_lr(2000, **kw) == pytest.approx(1e-4)
    assert cosine_lr(5000, **kw) == pytest.approx(1e-4)
    lrs = [cosine_lr(s, **kw) for s in range(100, 2001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    step = 700
    expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * 600 / 1900)) * 9e-4
    assert cosine_lr(step, **kw) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, theirs = twin_params("float64")
    set_grads(ours, theirs, 0, "float64")
    total = clip_grad_norm(ours, max_norm)
    t_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert total == pytest.approx(t_total.item(), rel=1e-12)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-12)


def test_k_micro_batches_equal_one_big_batch_including_clipping():
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dtype="float64")
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 13, (4, 8))
    targets = rng.integers(0, 13, (4, 8))
    for row, start in enumerate((0, 3, 5, 6)):   # the same number of ignored targets in every row, so
        targets[row, start:start + 2] = -100      # each micro-batch's mean is over as many tokens
    results = []
    for k in (1, 2, 4):
        model = GPT(cfg, rng=np.random.default_rng(0))
        opt = AdamW(param_groups(model, 0.1), lr=1e-2)
        for i in range(k):
            rows = slice(i * 4 // k, (i + 1) * 4 // k)
            _, loss = model(idx[rows], targets[rows])
            (loss * (1.0 / k)).backward()
        total = clip_grad_norm(model.parameters(), 0.1)
        grads = [p.grad.copy() for p in model.parameters()]
        opt.step()
        results.append((total, grads, [p.data.copy() for p in model.parameters()]))
    total, grads, params = results[0]
    assert total > 0.1   # clipping was active
    for other_total, other_grads, other_params in results[1:]:
        assert other_total == pytest.approx(total, rel=1e-12)
        for a, b in zip(grads, other_grads):
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-15)
        for a, b in zip(params, other_params):
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-13)
