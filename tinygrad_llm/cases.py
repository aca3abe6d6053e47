"""One catalogue of op cases: each case once, run by the gradcheck CLI (python -m tinygrad_llm.gradcheck)
and by the test suites (against PyTorch, fused against composite, GPU against CPU, kernels on against off).

A case is a name, `fn(M, *tensors)` (M is the module whose ops it calls: tinygrad_llm.functional, or
tinygrad_llm.composite for the same op built from primitives), its inputs (shapes drawn at random, or
fixed arrays such as token ids and targets), and where PyTorch has the op, `torch_fn(torch, *tensors)`:
the oracle, written against the torch module it is handed, so that this package never imports torch.
`op` names the Function class a case exercises (its `kernels` say which kernels it reaches).
"""
import zlib
from dataclasses import dataclass

import numpy as np

from .tensor import cat, where


@dataclass(frozen=True)
class Draw:
    """Random input of `shape`: normal times `scale`, or uniform in [low, high) when low is given."""
    shape: tuple
    scale: float = 1.0
    low: float = None
    high: float = None


def positive(*shape):
    return Draw(shape, low=0.5, high=2.0)


def normal(*shape, scale=1.0):
    return Draw(shape, scale=scale)


@dataclass(frozen=True)
class Case:
    name: str
    fn: object                 # fn(M, *tensors) -> Tensor
    inputs: tuple              # shapes, Draw specs or fixed arrays, one per positional input of fn
    torch_fn: object = None    # torch_fn(torch, *torch_tensors) -> torch tensor, or None (no torch equivalent)
    op: str = None             # the Function class the case exercises (functional.py / tensor.py)
    composite: bool = False    # tinygrad_llm.composite builds the same op from primitives
    devices_agree: bool = True  # False for random masks, which the GPU draws differently by design

    def arrays(self, dtype="float64", seed=None):
        """The inputs as arrays: drawn ones in `dtype` from a generator seeded by the case's name (or seed)."""
        rng = np.random.default_rng(zlib.crc32(self.name.encode()) if seed is None else seed)
        out = []
        for spec in self.inputs:
            if isinstance(spec, tuple):
                spec = Draw(spec)
            if isinstance(spec, Draw):
                a = rng.uniform(spec.low, spec.high, spec.shape) if spec.low is not None \
                    else rng.standard_normal(spec.shape) * spec.scale
                out.append(a.astype(dtype))
            else:
                a = np.asarray(spec)
                out.append(a.astype(dtype) if a.dtype.kind == "f" else a.copy())
        return out


def _end_aligned_causal(TQ, TK):
    """Query i sits at absolute position TK - TQ + i (torch's is_causal aligns to the top-left instead)."""
    return np.arange(TK)[None, :] <= np.arange(TQ)[:, None] + (TK - TQ)


def _torch_rope(torch, x, pos, theta=10000.0, interleaved=False):
    """Rotary embedding as Hugging Face Llama (rotate_half) or Meta Llama (interleaved pairs) write it."""
    HS = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, HS, 2, dtype=torch.float64) / HS)
    angle = torch.as_tensor(pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    rotate_half = torch.cat([-x[..., HS // 2:], x[..., : HS // 2]], dim=-1)
    return x * torch.cat([cos, cos], -1) + rotate_half * torch.cat([sin, sin], -1)


def _torch_self_attention(torch, qkv, n_head, causal=True, scale=None):
    """nanoGPT's CausalSelfAttention between c_attn and c_proj: split, view heads, transpose, SDPA, merge."""
    B, T, C3 = qkv.shape
    q, k, v = [t.view(B, T, n_head, C3 // 3 // n_head).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2)]
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)


def _torch_cross_entropy(torch, logits, targets, **kw):
    V = logits.shape[-1]
    out = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), **kw)
    return out.reshape(targets.shape) if kw.get("reduction") == "none" else out


def _torch_attention(torch, q, k, v, mask=None, scale=None):
    """Attention with an explicit boolean mask (True: attend), end-aligned causal folded in by the caller."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.tensor(mask), scale=scale)


_rng = np.random.default_rng(1234)
IDS = np.array([[0, 3, 3, 1], [4, 0, 0, 0]])
TARGETS = np.array([[1, -100, 4, 0], [2, 2, -100, 3]])
MASK = _rng.random((2, 1, 3, 5)) > 0.4
MASK[..., 0] = True   # every query keeps at least one key, so torch has no NaN rows

_PRIMITIVES = [
    Case("add", lambda M, x, y: x + y, [(3, 4), (3, 4)], lambda t, x, y: x + y, op="Add"),
    Case("add (broadcast)", lambda M, x, y: x + y, [(3, 4), (4,)], lambda t, x, y: x + y, op="Add"),
    Case("sub (broadcast)", lambda M, x, y: x - y, [(3, 1), (1, 4)], lambda t, x, y: x - y),
    Case("mul (broadcast)", lambda M, x, y: x * y, [(2, 3, 4), (3, 1)], lambda t, x, y: x * y),
    Case("div", lambda M, x, y: x / y, [(3, 4), positive(3, 4)], lambda t, x, y: x / y),
    Case("pow (tensor exponent)", lambda M, x, y: x ** y, [positive(3, 4), (3, 4)], lambda t, x, y: x ** y),
    Case("pow (scalar exponent)", lambda M, x: x ** 3, [(3, 4)], lambda t, x: x ** 3),
    Case("neg", lambda M, x: -x, [(5,)], lambda t, x: -x),
    Case("matmul (batched)", lambda M, a, b: a @ b, [(2, 3, 4), (4, 5)], lambda t, a, b: a @ b),
    Case("matmul (vector)", lambda M, a, b: a @ b, [(4,), (2, 4, 3)], lambda t, a, b: a @ b),
    Case("matmul (broadcast)", lambda M, a, b: a @ b, [(2, 1, 3, 4), (2, 4, 5)], lambda t, a, b: a @ b),
    Case("exp", lambda M, x: x.exp(), [(3, 4)], lambda t, x: x.exp()),
    Case("log", lambda M, x: x.log(), [positive(3, 4)], lambda t, x: x.log()),
    Case("sqrt", lambda M, x: x.sqrt(), [positive(3, 4)], lambda t, x: x.sqrt()),
    Case("tanh", lambda M, x: x.tanh(), [(3, 4)], lambda t, x: x.tanh()),
    Case("sum (axis)", lambda M, x: x.sum(axis=1), [(3, 4, 2)], lambda t, x: x.sum(dim=1)),
    Case("mean (keepdims)", lambda M, x: x.mean(axis=(0, 2), keepdims=True), [(3, 4, 2)],
         lambda t, x: x.mean(dim=(0, 2), keepdim=True)),
    Case("max (axis)", lambda M, x: x.max(axis=-1), [(3, 5)], lambda t, x: x.max(dim=-1).values),
    Case("reshape", lambda M, x: x.reshape(4, 3), [(3, 4)], lambda t, x: x.reshape(4, 3)),
    Case("permute", lambda M, x: x.permute(2, 0, 1), [(2, 3, 4)], lambda t, x: x.permute(2, 0, 1)),
    Case("getitem (repeated ints)", lambda M, x: x[np.array([0, 2, 0])], [(3, 4)], lambda t, x: x[[0, 2, 0]]),
    Case("getitem (slice)", lambda M, x: x[:, 1:3], [(3, 4)], lambda t, x: x[:, 1:3]),
    Case("getitem (int, step, repeated ints)", lambda M, x: x[1, :, ::2, [0, 3, 3]], [(2, 3, 5, 4)]),
    Case("cat", lambda M, x, y: cat([x, y], axis=1), [(2, 3), (2, 2)], lambda t, x, y: t.cat([x, y], dim=1)),
    Case("split", lambda M, x: x.split([1, 3], axis=1)[1], [(2, 4)], lambda t, x: x.split([1, 3], dim=1)[1]),
    Case("where", lambda M, x, y: where(x.data > 0, x, y), [(3, 4), (4,)], lambda t, x, y: t.where(x > 0, x, y)),
]

_FUNCTIONAL = [
    Case("linear", lambda M, x, w, b: M.linear(x, w, b), [(2, 3, 4), (4, 5), (5,)], lambda t, x, w, b: x @ w + b,
         op="Linear", composite=True),
    Case("linear (no bias)", lambda M, x, w: M.linear(x, w), [(3, 4), (4, 2)], lambda t, x, w: x @ w,
         op="Linear", composite=True),
    Case("embedding (repeated ids)", lambda M, ids, w: M.embedding(ids, w), [IDS, (5, 3)],
         lambda t, ids, w: t.nn.functional.embedding(ids, w), op="Embedding", composite=True),
    Case("layer_norm", lambda M, x, w, b: M.layer_norm(x, w, b), [(2, 3, 8), (8,), (8,)],
         lambda t, x, w, b: t.nn.functional.layer_norm(x, (8,), w, b), op="LayerNorm", composite=True),
    Case("layer_norm (eps, no affine)", lambda M, x: M.layer_norm(x, eps=1e-3), [(4, 6)],
         lambda t, x: t.nn.functional.layer_norm(x, (6,), eps=1e-3), op="LayerNorm", composite=True),
    Case("rms_norm", lambda M, x, w: M.rms_norm(x, w), [(2, 3, 8), (8,)],
         lambda t, x, w: t.nn.functional.rms_norm(x, (8,), w), op="RMSNorm", composite=True),
    Case("rms_norm (eps)", lambda M, x, w: M.rms_norm(x, w, eps=1e-5), [(4, 6), (6,)],
         lambda t, x, w: t.nn.functional.rms_norm(x, (6,), w, eps=1e-5), op="RMSNorm", composite=True),
    Case("gelu (none, erf)", lambda M, x: M.gelu(x), [normal(6, 7, scale=4)],
         lambda t, x: t.nn.functional.gelu(x), op="GELU", composite=True),
    Case("gelu (tanh)", lambda M, x: M.gelu(x, approximate="tanh"), [normal(6, 7, scale=4)],
         lambda t, x: t.nn.functional.gelu(x, approximate="tanh"), op="GELU", composite=True),
    Case("silu", lambda M, x: M.silu(x), [normal(6, 7, scale=4)], lambda t, x: t.nn.functional.silu(x),
         op="SiLU", composite=True),
    Case("swiglu", lambda M, g, u: M.swiglu(g, u), [(3, 5), (3, 5)], lambda t, g, u: t.nn.functional.silu(g) * u,
         op="SwiGLU", composite=True),
    Case("swiglu (broadcast)", lambda M, g, u: M.swiglu(g, u), [(2, 3, 5), (3, 1)],
         lambda t, g, u: t.nn.functional.silu(g) * u, op="SwiGLU", composite=True),
    Case("softmax", lambda M, x: M.softmax(x), [(2, 3, 5)], lambda t, x: t.softmax(x, -1), op="Softmax",
         composite=True),
    Case("softmax (axis 1)", lambda M, x: M.softmax(x, axis=1), [(2, 3, 5)], lambda t, x: t.softmax(x, 1),
         op="Softmax", composite=True),
    Case("log_softmax", lambda M, x: M.log_softmax(x), [(2, 3, 5)], lambda t, x: t.log_softmax(x, -1),
         op="LogSoftmax", composite=True),
    Case("log_softmax (axis 0)", lambda M, x: M.log_softmax(x, axis=0), [(2, 3, 5)], lambda t, x: t.log_softmax(x, 0),
         op="LogSoftmax", composite=True),
    Case("cross_entropy (mean, ignore_index)", lambda M, x, y: M.cross_entropy(x, y), [(2, 4, 5), TARGETS],
         _torch_cross_entropy, op="CrossEntropy", composite=True),
    Case("cross_entropy (sum)", lambda M, x, y: M.cross_entropy(x, y, reduction="sum"), [(2, 4, 5), TARGETS],
         lambda t, x, y: _torch_cross_entropy(t, x, y, reduction="sum"), op="CrossEntropy", composite=True),
    Case("cross_entropy (none)", lambda M, x, y: M.cross_entropy(x, y, reduction="none"), [(2, 4, 5), TARGETS],
         lambda t, x, y: _torch_cross_entropy(t, x, y, reduction="none"), op="CrossEntropy", composite=True),
    Case("cross_entropy (2-D, ignore 2)", lambda M, x, y: M.cross_entropy(x, y, ignore_index=2),
         [(6, 4), np.array([0, 2, 3, 2, 1, 1])], lambda t, x, y: t.nn.functional.cross_entropy(x, y, ignore_index=2),
         op="CrossEntropy", composite=True),
    Case("dropout", lambda M, x: M.dropout(x, 0.3, rng=np.random.default_rng(1)), [(3, 4)], op="Dropout",
         devices_agree=False),
    Case("dropout_add", lambda M, x, y: M.dropout_add(x, y, 0.3, rng=np.random.default_rng(1)), [(3, 4), (3, 4)],
         op="DropoutAdd", composite=True, devices_agree=False),
    Case("attention (causal)", lambda M, q, k, v: M.scaled_dot_product_attention(q, k, v), [(2, 3, 5, 4)] * 3,
         lambda t, q, k, v: t.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
         op="ScaledDotProductAttention", composite=True),
    Case("attention (full, scale)", lambda M, q, k, v: M.scaled_dot_product_attention(q, k, v, causal=False, scale=0.7),
         [(1, 2, 4, 3), (1, 2, 6, 3), (1, 2, 6, 5)],
         lambda t, q, k, v: t.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.7),
         op="ScaledDotProductAttention", composite=True),
    Case("attention (causal, TQ<TK)", lambda M, q, k, v: M.scaled_dot_product_attention(q, k, v),
         [(2, 2, 3, 4), (2, 2, 7, 4), (2, 2, 7, 4)],
         lambda t, q, k, v: _torch_attention(t, q, k, v, _end_aligned_causal(3, 7)),
         op="ScaledDotProductAttention", composite=True),
    Case("attention (causal+mask, TQ<TK)", lambda M, q, k, v: M.scaled_dot_product_attention(q, k, v, mask=MASK),
         [(2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4)],
         lambda t, q, k, v: _torch_attention(t, q, k, v, MASK & _end_aligned_causal(3, 5)),
         op="ScaledDotProductAttention", composite=True),
    Case("attention (causal, dropout_p)",   # a fresh generator each call: the same mask every evaluation
         lambda M, q, k, v: M.scaled_dot_product_attention(q, k, v, dropout_p=0.3, rng=np.random.default_rng(2)),
         [(2, 2, 4, 3)] * 3, op="ScaledDotProductAttention", devices_agree=False),
    Case("self_attention (2 heads)", lambda M, x: M.self_attention(x, 2), [(2, 5, 12)],
         lambda t, x: _torch_self_attention(t, x, 2), op="SelfAttention", composite=True),
    Case("self_attention (full, scale)", lambda M, x: M.self_attention(x, 1, causal=False, scale=0.7), [(1, 4, 9)],
         lambda t, x: _torch_self_attention(t, x, 1, causal=False, scale=0.7), op="SelfAttention", composite=True),
    Case("self_attention (2 heads, dropout_p)",
         lambda M, x: M.self_attention(x, 2, dropout_p=0.3, rng=np.random.default_rng(3)), [(2, 4, 12)],
         op="SelfAttention", devices_agree=False),
    Case("rope", lambda M, x: M.rope(x, np.arange(4, 9)), [(2, 3, 5, 8)],
         lambda t, x: _torch_rope(t, x, np.arange(4, 9)), op="RoPE", composite=True),
    Case("rope (interleaved, theta)", lambda M, x: M.rope(x, np.arange(4), theta=500.0, interleaved=True),
         [(1, 2, 4, 6)], lambda t, x: _torch_rope(t, x, np.arange(4), 500.0, True), op="RoPE", composite=True),
    Case("lora_linear", lambda M, x, w, b, A, B: M.lora_linear(x, w, b, A, B, scale=2.0),
         [(2, 3, 4), (4, 5), (5,), (4, 2), (2, 5)], lambda t, x, w, b, A, B: x @ w + b + 2.0 * (x @ A @ B),
         op="LoRALinear", composite=True),
]

CASES = _PRIMITIVES + _FUNCTIONAL
BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
