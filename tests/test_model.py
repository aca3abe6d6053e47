"""The whole-model golden test: our GPT against a small PyTorch mirror written here, with the same weights.

The mirror uses Hugging Face GPT-2's module names and Conv1D layout (weights (in, out)), so our
state dict loads into it by name with no renaming or transposing: that is the checkpoint contract.
Compared in float64: logits, loss, every parameter's gradient by name, then the losses of 10 AdamW steps.
"""
import math

import numpy as np
import pytest

from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW, param_groups

torch = pytest.importorskip("torch")
tnn, tF = torch.nn, torch.nn.functional


# ---- the PyTorch mirror ------------------------------------------------------------------------

class Conv1D(tnn.Module):
    """GPT-2's linear layer: weight (in, out), y = x W + b."""

    def __init__(self, n_in, n_out, bias):
        super().__init__()
        self.weight = tnn.Parameter(torch.zeros(n_in, n_out))
        self.bias = tnn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


def torch_rope(x, start, theta):
    """Half-split rotary embedding on (B, NH, T, HS) at positions start .. start+T-1."""
    T, HS = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, HS, 2, dtype=torch.float64) / HS)
    angle = torch.arange(start, start + T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :HS // 2], x[..., HS // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TorchAttention(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd, cfg.bias)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd, cfg.bias)

    def forward(self, x):
        B, T, C = x.shape
        NH = self.cfg.n_head
        q, k, v = [t.view(B, T, NH, C // NH).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2)]
        if self.cfg.position == "rope":
            q, k = torch_rope(q, 0, self.cfg.rope_theta), torch_rope(k, 0, self.cfg.rope_theta)
        # attention dropout as ours (the golden tests run with dropout 0, so they stay exact)
        y = tF.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.cfg.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class TorchMLP(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        self.c_fc = Conv1D(cfg.n_embd, cfg.mlp_hidden, cfg.bias)
        if cfg.mlp == "swiglu":
            self.c_fc2 = Conv1D(cfg.n_embd, cfg.mlp_hidden, cfg.bias)
        self.c_proj = Conv1D(cfg.mlp_hidden, cfg.n_embd, cfg.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.c_proj(tF.silu(self.c_fc(x)) * self.c_fc2(x))
        return self.c_proj(tF.gelu(self.c_fc(x), approximate="tanh"))


def torch_norm(cfg):
    if cfg.norm == "rmsnorm":
        return tnn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return tnn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class TorchBlock(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = torch_norm(cfg), TorchAttention(cfg), torch_norm(cfg), TorchMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        parts = dict(wte=tnn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.position == "learned":
            parts["wpe"] = tnn.Embedding(cfg.block_size, cfg.n_embd)
        parts["h"] = tnn.ModuleList([TorchBlock(cfg) for _ in range(cfg.n_layer)])
        parts["ln_f"] = torch_norm(cfg)
        self.transformer = tnn.ModuleDict(parts)
        self.lm_head = tnn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.transformer.wte(idx)
        if self.cfg.position == "learned":
            x = x + self.transformer.wpe(torch.arange(T))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = tF.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def torch_mirror(model):
    """A TorchGPT holding a copy of `model`'s weights, loaded by name (strict) from our state dict."""
    cfg = model.config
    torch_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    mirror = TorchGPT(cfg).to(torch_dtype)
    mirror.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=True)
    return mirror


# ---- helpers -----------------------------------------------------------------------------------

TINY = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
MODERN = dict(norm="rmsnorm", mlp="swiglu", position="rope")


def make(seed=0, **overrides):
    return GPT(GPTConfig(**{**TINY, "dtype": "float64", **overrides}), rng=np.random.default_rng(seed))


def batch(seed, B=3, T=8, V=13, ignore=True):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    if ignore:
        targets[0, :3] = -100
    return idx, targets


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ---- golden tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("switches", [{}, MODERN, dict(bias=False, tie_embeddings=False)], ids=["gpt2", "modern", "nobias-untied"])
def test_logits_loss_and_every_gradient_match_torch(switches):
    model = make(**switches)
    mirror = torch_mirror(model)
    idx, targets = batch(1)

    logits, loss = model(idx, targets)
    loss.backward()
    t_logits, t_loss = mirror(torch.from_numpy(idx), torch.from_numpy(targets))
    t_loss.backward()

    assert logits.dtype == np.float64
    assert rel_err(logits.numpy(), t_logits.detach().numpy()) < 1e-9
    assert rel_err(loss.item(), t_loss.item()) < 1e-9
    ours = dict(model.named_parameters())
    theirs = dict(mirror.named_parameters())
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert rel_err(ours[name].grad, p.grad.numpy()) < 1e-9, name


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_ten_adamw_steps_match_torch(switches):
    model = make(**switches)
    mirror = torch_mirror(model)
    opt = AdamW(param_groups(model, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.95))
    t_params = list(mirror.parameters())
    t_opt = torch.optim.AdamW([{"params": [p for p in t_params if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in t_params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95))
    for step in range(10):
        idx, targets = batch(100 + step)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        _, t_loss = mirror(torch.from_numpy(idx), torch.from_numpy(targets))
        t_loss.backward()
        t_opt.step()
        t_opt.zero_grad()
        assert rel_err(loss.item(), t_loss.item()) < 1e-9, f"step {step}"
    for name, p in mirror.named_parameters():
        assert rel_err(dict(model.named_parameters())[name].data, p.detach().numpy()) < 1e-9, name


def test_tied_weight_gradient_is_the_sum_of_both_uses():
    tied = make()
    untied = make(tie_embeddings=False)
    state = tied.state_dict()
    untied.load_state_dict(state)          # lm_head.weight gets its own copy of wte
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    idx, targets = batch(2)
    tied(idx, targets)[1].backward()
    untied(idx, targets)[1].backward()
    both = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    np.testing.assert_allclose(tied.transformer.wte.weight.grad, both, rtol=1e-12, atol=1e-15)
    assert tied.num_params() == untied.num_params() - 13 * 16


def test_gpt2_names_shapes_and_init():
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32)
    model = GPT(cfg, rng=np.random.default_rng(0))
    C, V = 32, 50
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (16, C),
                "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,), "lm_head.weight": (V, C)}
    for i in range(3):
        h = f"transformer.h.{i}."
        expected.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                         h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
                         h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                         h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
                         h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    assert shapes == expected
    sd = model.state_dict()
    assert all(v.dtype == np.float32 for v in sd.values())
    assert abs(sd["transformer.wte.weight"].std() - 0.02) < 0.002
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 0.002
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std() - 0.02 / math.sqrt(6)) < 0.001
    assert np.all(sd["transformer.h.1.attn.c_attn.bias"] == 0) and np.all(sd["transformer.h.1.ln_2.weight"] == 1)
    # the same seed builds the same model
    again = GPT(cfg, rng=np.random.default_rng(0)).state_dict()
    assert all(np.array_equal(sd[k], again[k]) for k in sd)


def test_float32_model_runs_in_float32():
    model = GPT(GPTConfig(**TINY), rng=np.random.default_rng(0))
    logits, loss = model(*batch(3))
    assert logits.dtype == np.float32 and loss.dtype == np.float32
    loss.backward()
    assert all(p.grad.dtype == np.float32 for p in model.parameters())


def test_bad_inputs_raise_clear_errors_before_any_work():
    model = make()
    idx, targets = batch(4)
    bad = idx.copy()
    bad[1, 2] = 13
    with pytest.raises(ValueError, match=r"token ids \[13\].*\[0, 13\)"):
        model(bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"\[-1\]"):
        model(bad)
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        model(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="targets must be"):
        model(idx, targets[:, :4])
    bad_targets = targets.copy()
    bad_targets[0, 5] = 99
    with pytest.raises(ValueError, match=r"target ids \[99\]"):
        model(idx, bad_targets)
    with pytest.raises(ValueError, match="integer"):
        model(idx.astype(np.float32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=4), "not divisible"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(position="alibi"), "position"),
    (dict(dtype="float16"), "dtype"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **kwargs})


def test_config_round_trips_through_a_dict():
    cfg = GPTConfig(**TINY, **MODERN, dropout=0.1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_heads": 3})


def test_load_state_dict_errors_name_keys_and_shapes_and_change_nothing():
    model, other = make(seed=0), make(seed=1)
    before = model.state_dict()
    state = other.state_dict()
    state["transformer.h.0.attn.c_attn.weight"] = np.zeros((16, 47))
    del state["transformer.ln_f.bias"]
    state["transformer.h.0.attn.c_attn.extra"] = np.zeros(3)
    with pytest.raises(ValueError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    assert "transformer.h.0.attn.c_attn.weight: checkpoint (16, 47), model (16, 48)" in message
    assert "missing keys transformer.ln_f.bias" in message
    assert "unexpected keys transformer.h.0.attn.c_attn.extra" in message
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_load_state_dict_with_or_without_tied_lm_head_and_hf_layout():
    model, other = make(seed=0), make(seed=1)
    state = other.state_dict()
    wte = model.transformer.wte.weight
    model.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"})
    assert model.transformer.wte.weight is wte and model.lm_head.weight is wte
    np.testing.assert_array_equal(wte.data, state["transformer.wte.weight"])
    # a Hugging Face GPT2Model dict: no "transformer." prefix, causal-mask buffers beside the weights
    hf = {k[len("transformer."):]: v for k, v in make(seed=2).state_dict().items() if k.startswith("transformer.")}
    hf["h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8)))
    hf["h.0.attn.masked_bias"] = np.array(-1e4)
    model.load_state_dict(hf)
    np.testing.assert_array_equal(model.state_dict()["lm_head.weight"], hf["wte.weight"])
    # torch tensors straight from a torch model's state_dict load too
    mirror = torch_mirror(other)
    model.load_state_dict(mirror.state_dict())
    np.testing.assert_array_equal(model.state_dict()["transformer.h.1.mlp.c_fc.weight"], state["transformer.h.1.mlp.c_fc.weight"])
    tampered = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="tied"):
        model.load_state_dict(tampered)


def _unfused_block_forward(self, x, rng=None, kv_cache=None, layer=0):
    x = x + self.attn(self.ln_1(x), rng, kv_cache, layer)
    return x + self.mlp(self.ln_2(x), rng)


@pytest.mark.parametrize("switches", [{}, MODERN, dict(n_kv_head=1)], ids=["gpt2", "modern", "gqa"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_residual_dropout_changes_no_bit_of_training(switches, dtype, monkeypatch):
    """The block's dropout-add ops give the losses and gradients of Dropout then Add, bit for bit, over AdamW
    steps with dropout: the same masks drawn in the same order from the run's generator."""
    from tinygrad_llm import functional as F
    from tinygrad_llm.model import Block
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Block, "forward", _unfused_block_forward)
        calls, apply = [], F.DropoutAdd.apply

        def counted(*args, **kwargs):
            calls.append(1)
            return apply(*args, **kwargs)
        monkeypatch.setattr(F.DropoutAdd, "apply", counted)
        model = make(**switches, dtype=dtype, dropout=0.2)
        opt = AdamW(param_groups(model, 0.1), lr=1e-2)
        rng, out = np.random.default_rng(3), []
        for step in range(3):
            _, loss = model(*batch(step), rng=rng)
            loss.backward()
            out.append([loss.item()] + [p.grad.copy() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        out.append(rng.random())   # the generator left at the same state
        runs.append(out)
        assert len(calls) == (3 * 2 * model.config.n_layer if fused else 0)
    for a, b in zip(*runs):
        if isinstance(a, float):
            assert a == b
        else:
            assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_dropout_needs_rng_in_training_and_is_off_in_eval():
    model = make(dropout=0.5)
    idx, targets = batch(5)
    with pytest.raises(ValueError, match="rng"):
        model(idx, targets)
    a = model(idx, targets, rng=np.random.default_rng(0))[1].item()
    b = model(idx, targets, rng=np.random.default_rng(0))[1].item()
    assert a == b
    model.eval()
    c = model(idx, targets)[1].item()
    assert c == model(idx, targets)[1].item() != a
