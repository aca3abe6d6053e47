"""Modules: parameters, names, state dicts, modes, devices, and each layer against torch.nn."""
import numpy as np
import pytest

from tinygrad_llm.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, RMSNorm
from tinygrad_llm.tensor import Tensor

torch = pytest.importorskip("torch")


class Tied(Module):
    def __init__(self, rng):
        self.emb = Embedding(5, 3, rng=rng, dtype="float64")
        self.layers = ModuleList([Linear(3, 3, rng=rng, dtype="float64"), LayerNorm(3, dtype="float64")])
        self.out = Module()
        self.out.weight = self.emb.weight   # the same Tensor under a second name
        self.drop = Dropout(0.5)


def test_parameters_are_deduplicated_and_named_in_order():
    m = Tied(np.random.default_rng(0))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["emb.weight", "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert len(m.parameters()) == 5 and all(p.requires_grad for p in m.parameters())
    assert list(m.state_dict()) == names + ["out.weight"]   # state dicts list tied weights under every name


def test_state_dict_is_a_snapshot_and_load_keeps_the_same_tensors():
    m = Tied(np.random.default_rng(0))
    other = Tied(np.random.default_rng(1)).state_dict()
    snap = m.state_dict()
    weight = m.layers[0].weight
    weight_array = weight.data
    m.load_state_dict(other)
    assert m.layers[0].weight is weight and weight.data is weight_array
    np.testing.assert_array_equal(weight.data, other["layers.0.weight"])
    assert not np.array_equal(snap["layers.0.weight"], other["layers.0.weight"])


def test_load_state_dict_non_strict_reports_missing_and_unexpected():
    m = Tied(np.random.default_rng(0))
    state = m.state_dict()
    del state["layers.1.bias"]
    state["extra"] = np.zeros(2)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert missing == ["layers.1.bias"] and unexpected == ["extra"]
    with pytest.raises(ValueError, match="missing keys layers.1.bias.*unexpected keys extra"):
        m.load_state_dict(state)
    state["layers.1.bias"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"layers.1.bias: checkpoint \(4,\), model \(3,\)"):
        m.load_state_dict(state, strict=False)


def test_train_eval_zero_grad_and_to():
    m = Tied(np.random.default_rng(0))
    assert m.training and m.drop.training
    m.eval()
    assert not m.training and not m.drop.training and not m.layers[1].training
    m.train()
    assert m.drop.training
    for p in m.parameters():
        p.grad = np.ones(p.shape)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    params = m.parameters()
    assert m.to("cpu") is m and all(a is b for a, b in zip(params, m.parameters()))
    assert m.device == "cpu"


def torch_twin(x):
    return torch.tensor(x, requires_grad=True)


def check_layer(ours, theirs, x, params):
    """Forward and gradients of (out * dout).sum() for the input and each (our, torch) parameter pair."""
    dout = np.random.default_rng(9).standard_normal(ours(Tensor(x)).shape)
    xt, xo = torch_twin(x), Tensor(x, requires_grad=True)
    out, t_out = ours(xo), theirs(xt)
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-10, atol=1e-12)
    (out * Tensor(dout)).sum().backward()
    (t_out * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    for mine, ref in params:
        np.testing.assert_allclose(mine.grad, ref.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_linear_is_x_w_plus_b_with_w_in_out():
    rng = np.random.default_rng(0)
    lin = Linear(4, 6, rng=rng, dtype="float64")
    assert lin.weight.shape == (4, 6) and lin.bias.shape == (6,)
    w, b = torch_twin(lin.weight.data.copy()), torch_twin(lin.bias.data + 0.5)
    lin.bias.data += 0.5
    check_layer(lin, lambda x: torch.nn.functional.linear(x, w.T, b), rng.standard_normal((2, 3, 4)), [(lin.weight, w), (lin.bias, b)])
    assert Linear(4, 6, bias=False, rng=rng).bias is None


def test_layernorm_and_rmsnorm_match_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8)) * 3 + 1
    ln = LayerNorm(8, dtype="float64")
    ln.weight.data[...] = rng.standard_normal(8)
    ln.bias.data[...] = rng.standard_normal(8)
    tln = torch.nn.LayerNorm(8, dtype=torch.float64)
    with torch.no_grad():
        tln.weight.copy_(torch.from_numpy(ln.weight.data))
        tln.bias.copy_(torch.from_numpy(ln.bias.data))
    check_layer(ln, tln, x, [(ln.weight, tln.weight), (ln.bias, tln.bias)])
    rms = RMSNorm(8, eps=1e-6, dtype="float64")
    rms.weight.data[...] = rng.standard_normal(8)
    trms = torch.nn.RMSNorm(8, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        trms.weight.copy_(torch.from_numpy(rms.weight.data))
    check_layer(rms, trms, x, [(rms.weight, trms.weight)])


def test_embedding_gathers_rows_and_accumulates_repeats():
    emb = Embedding(5, 3, rng=np.random.default_rng(0), dtype="float64")
    idx = np.array([[1, 1, 4]])
    out = emb(idx)
    np.testing.assert_array_equal(out.numpy()[0], emb.weight.data[[1, 1, 4]])
    out.sum().backward()
    np.testing.assert_array_equal(emb.weight.grad[:, 0], [0, 2, 0, 0, 1])


def test_dropout_train_and_eval():
    drop = Dropout(0.5)
    x = Tensor(np.ones((100, 100)))
    with pytest.raises(ValueError, match="rng"):
        drop(x)
    y = drop(x, np.random.default_rng(0)).numpy()
    assert set(np.unique(y)) == {0.0, 2.0} and abs((y == 0).mean() - 0.5) < 0.05
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


def test_dropout_with_a_residual_adds_it_with_the_same_mask():
    drop = Dropout(0.5)
    x, r = (Tensor(np.random.default_rng(s).standard_normal((20, 30)), requires_grad=True) for s in (1, 2))
    out = drop(x, np.random.default_rng(0), residual=r)
    assert out._ctx.op_name == "DropoutAdd"
    np.testing.assert_array_equal(out.numpy(), (r + drop(x, np.random.default_rng(0))).numpy())
    assert 0.4 < (out.numpy() == r.numpy()).mean() < 0.6
    out = drop.eval()(x, residual=r)
    assert out._ctx.op_name == "Add"
    np.testing.assert_array_equal(out.numpy(), r.numpy() + x.numpy())
