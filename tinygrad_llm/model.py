"""GPTConfig and GPT: a GPT-2 style transformer whose state dict is exactly Hugging Face GPT-2's.

    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = GPT(config, rng=np.random.default_rng(1337))
    logits, loss = model(idx, targets)        # idx, targets: int (B, T); logits (B, T, V); loss scalar
    loss.backward()

With the default switches the parameters are named and shaped as in GPT-2 checkpoints
(transformer.wte.weight (V, C), transformer.h.0.attn.c_attn.weight (C, 3C), ..., lm_head.weight (V, C)
tied to transformer.wte.weight), so a GPT-2 state dict loads with no renaming or transposing.
Modern switches: norm="rmsnorm", mlp="swiglu", position="rope" (then there is no wpe), bias=False, and
n_kv_head < n_head for grouped-query attention (c_attn then makes C query columns and n_kv_head heads of keys
and of values). GPT.from_pretrained / save_pretrained read and write Hugging Face GPT-2 and Llama folders (hub.py).

Generation uses a KVCache: `model(idx_new, kv_cache=cache)` runs only the new tokens, attending to the
keys and values cached from earlier calls; positions start at the cache's length.
"""
import contextlib
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend, precision
from . import functional as F
from .nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleDict, ModuleList, RMSNorm
from .tensor import Context, Tensor, no_grad

IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True                 # biases in every Linear and LayerNorm (GPT-2: True)
    dtype: str = "float32"            # "float64" builds every parameter and activation in float64; "bfloat16":
                                      # float32 parameters, bf16 matrix products (precision.py's policy)
    norm: str = "layernorm"           # "layernorm" | "rmsnorm"
    mlp: str = "gelu"                 # "gelu" (GPT-2) | "swiglu" (Llama)
    position: str = "learned"         # "learned" (wpe, GPT-2) | "rope" (rotary, half-split layout)
    tie_embeddings: bool = True       # lm_head.weight is transformer.wte.weight
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    gelu_approximate: str = "tanh"    # GPT-2's checkpoints were trained with the tanh form
    mlp_hidden: int = None            # None: 4C for gelu, 8C/3 rounded up to a multiple of 8 for swiglu
    n_kv_head: int = None             # key/value heads (grouped-query attention, Llama); None: n_head

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        choices = {"dtype": precision.DTYPES, "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "position": ("learned", "rope"), "gelu_approximate": ("tanh", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: rope needs an even head size, got {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head is not None and (not isinstance(self.n_kv_head, (int, np.integer)) or self.n_kv_head <= 0
                                           or self.n_head % self.n_kv_head):
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head!r} must be a positive divisor of n_head={self.n_head}")
        if self.mlp_hidden is None:
            C = self.n_embd
            self.mlp_hidden = 4 * C if self.mlp == "gelu" else -(-8 * C // 3 // 8) * 8
        elif self.mlp_hidden <= 0:
            raise ValueError(f"GPTConfig.mlp_hidden must be positive, got {self.mlp_hidden}")

    @property
    def param_dtype(self):
        """The dtype of the parameters (and activations): float32 for "bfloat16", else dtype."""
        return precision.param_dtype(self.dtype)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {unknown}")
        return cls(**d)


class KVCache:
    """Per-layer keys and values of the tokens seen so far, for generation.

    k[i], v[i]: arrays (B, KVH, block_size, HS) (KVH = n_kv_head, or n_head), filled up to `length`. A forward with the cache
    runs only the new tokens, at positions length .. length+T-1, then advances `length`.
    """

    def __init__(self, config, batch_size, device="cpu"):
        xp = backend.cupy_module() if device == "cuda" else np
        HS = config.n_embd // config.n_head
        shape = (batch_size, config.n_kv_head or config.n_head, config.block_size, HS)
        self.k = [xp.zeros(shape, dtype=config.param_dtype) for _ in range(config.n_layer)]
        self.v = [xp.zeros(shape, dtype=config.param_dtype) for _ in range(config.n_layer)]
        self.batch_size = batch_size
        self.length = 0


class CausalSelfAttention(Module):
    def __init__(self, config, rng):
        C, L, dtype = config.n_embd, config.n_layer, config.param_dtype
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.rope_theta = config.rope_theta if config.position == "rope" else None
        # q (C) then k and v (KVH * HS each): 3C columns unless keys and values are shared by groups of heads
        kv_width = self.n_kv_head * (C // config.n_head)
        self.c_attn = Linear(C, C + 2 * kv_width, bias=config.bias, rng=rng, dtype=dtype)
        # residual projections start smaller: the residual stream sums 2 L of them (GPT-2 paper)
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng, std=0.02 / math.sqrt(2 * L), dtype=dtype)
        self.attn_dropout = config.dropout   # on the attention probabilities (nanoGPT's attn_dropout)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x, rng=None, kv_cache=None, layer=0, residual=None):
        """(B, T, C) -> (B, T, C); with `residual` (B, T, C), residual + the output (one dropout-add op)."""
        B, T, C = x.shape
        NH, KVH, HS = self.n_head, self.n_kv_head, C // self.n_head
        qkv = self.c_attn(x)                                           # (B, T, C + 2 KVH HS)
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.rope_theta is None and kv_cache is None and KVH == NH:
            # one node for split heads -> attention -> merge heads (F.self_attention says why)
            y = F.self_attention(qkv, NH, causal=True, dropout_p=dropout_p, rng=rng)  # (B, T, C)
            return self.resid_dropout(self.c_proj(y), rng, residual=residual)
        q, k, v = qkv.split([C, KVH * HS, KVH * HS], axis=2)
        q = q.reshape(B, T, NH, HS).permute(0, 2, 1, 3)                 # (B, NH, T, HS)
        k, v = [t.reshape(B, T, KVH, HS).permute(0, 2, 1, 3) for t in (k, v)]  # (B, KVH, T, HS)
        start = kv_cache.length if kv_cache is not None else 0
        if self.rope_theta is not None:
            pos = np.arange(start, start + T)
            q = F.rope(q, pos, theta=self.rope_theta)
            k = F.rope(k, pos, theta=self.rope_theta)
        if kv_cache is not None:
            # write the new keys/values at positions start..start+T-1, attend to everything so far
            kv_cache.k[layer][:, :, start:start + T] = k.data
            kv_cache.v[layer][:, :, start:start + T] = v.data
            k = Tensor(kv_cache.k[layer][:, :, :start + T])
            v = Tensor(kv_cache.v[layer][:, :, :start + T])
        if KVH != NH:  # grouped-query attention: query head h reads key/value head h // (NH / KVH)
            group = backend.array_module(k.data).arange(NH) // (NH // KVH)   # on k's device
            k, v = k[:, group], v[:, group]                               # (B, NH, T', HS)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, causal=True, rng=rng, dropout_p=dropout_p)  # (B, NH, T, HS)
        else:
            # No graph with a cache, so the op's NumPy reference forward runs as is: one batched product over
            # every head. The cached keys are strided views of the cache, which the CPU kernel splits into a
            # work item per head: 347 vs 62 us a call at 100 cached positions (12 heads of 64).
            y = Tensor(F.ScaledDotProductAttention.forward(Context((False,) * 4), q.data, k.data, v.data,
                                                           causal=True, scale=1 / math.sqrt(HS)))
        y = y.permute(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y), rng, residual=residual)


class MLP(Module):
    def __init__(self, config, rng):
        C, H, L, dtype = config.n_embd, config.mlp_hidden, config.n_layer, config.param_dtype
        self.kind, self.gelu_approximate = config.mlp, config.gelu_approximate
        self.c_fc = Linear(C, H, bias=config.bias, rng=rng, dtype=dtype)
        if self.kind == "swiglu":
            self.c_fc2 = Linear(C, H, bias=config.bias, rng=rng, dtype=dtype)   # the "up" projection
        self.c_proj = Linear(H, C, bias=config.bias, rng=rng, std=0.02 / math.sqrt(2 * L), dtype=dtype)
        self.dropout = Dropout(config.dropout)

    def forward(self, x, rng=None, residual=None):
        """(B, T, C) -> (B, T, C); with `residual` (B, T, C), residual + the output (one dropout-add op)."""
        if self.kind == "swiglu":
            h = F.swiglu(self.c_fc(x), self.c_fc2(x))                  # silu(x Wg) * (x Wu), (B, T, H)
        else:
            h = F.gelu(self.c_fc(x), approximate=self.gelu_approximate)  # (B, T, 4C)
        return self.dropout(self.c_proj(h), rng, residual=residual)


def _norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps, dtype=config.param_dtype)
    return LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias, dtype=config.param_dtype)


class Block(Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config, rng):
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, rng)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config, rng)

    def forward(self, x, rng=None, kv_cache=None, layer=0):
        # each branch's dropout and the residual add are one op (F.dropout_add; a plain add in eval)
        x = self.attn(self.ln_1(x), rng, kv_cache, layer, residual=x)
        return self.mlp(self.ln_2(x), rng, residual=x)


class LMHead(Module):
    """(B, T, C) -> (B, T, V) with a weight of shape (V, C), as GPT-2's lm_head (a torch Linear)."""

    def __init__(self, weight):
        self.weight = weight

    def forward(self, x):
        return F.linear(x, self.weight.T)


class GPT(Module):
    def __init__(self, config, rng=None):
        """Build with GPT-2's init: weights N(0, 0.02), residual projections N(0, 0.02/sqrt(2 n_layer)),
        biases 0, norm weights 1. rng: an np.random.Generator; None means np.random.default_rng(0)."""
        rng = np.random.default_rng(0) if rng is None else rng
        self.config = config
        C, V, dtype = config.n_embd, config.vocab_size, config.param_dtype
        parts = dict(wte=Embedding(V, C, rng=rng, dtype=dtype))
        if config.position == "learned":
            parts["wpe"] = Embedding(config.block_size, C, rng=rng, dtype=dtype)
        parts["drop"] = Dropout(config.dropout)
        parts["h"] = ModuleList([Block(config, rng) for _ in range(config.n_layer)])
        parts["ln_f"] = _norm(config)
        self.transformer = ModuleDict(**parts)
        if config.tie_embeddings:
            self.lm_head = LMHead(self.transformer.wte.weight)   # the same Tensor: gradients sum
        else:
            self.lm_head = LMHead(Tensor((rng.standard_normal((V, C)) * 0.02).astype(dtype), requires_grad=True))

    def num_params(self):
        """Number of parameter elements, tied weights counted once."""
        return sum(p.size for p in self.parameters())

    def new_kv_cache(self, batch_size):
        return KVCache(self.config, batch_size, self.device)

    def _check_inputs(self, idx, targets, start):
        cfg = self.config
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx must be an integer array of shape (B, T), got dtype {idx.dtype} shape {tuple(idx.shape)}")
        B, T = idx.shape
        if start + T > cfg.block_size:
            where = f" after {start} cached positions" if start else ""
            raise ValueError(f"sequence length {T}{where} exceeds block_size {cfg.block_size}")
        if targets is not None and (tuple(targets.shape) != (B, T) or targets.dtype.kind not in "iu"):
            raise ValueError(f"targets must be an integer array of shape {(B, T)} like idx, got dtype {targets.dtype} shape {tuple(targets.shape)}")
        # one test of both on the device (on a GPU, one wait for the host); the message is worked out only on failure.
        # Checked here, the ids are not checked again by F.embedding and F.cross_entropy (see _forward).
        bad_idx = (idx < 0) | (idx >= cfg.vocab_size)
        bad_targets = None
        any_bad = bad_idx.any()
        if targets is not None:
            bad_targets = ((targets < 0) | (targets >= cfg.vocab_size)) & (targets != IGNORE_INDEX)
            any_bad = any_bad | bad_targets.any()
        if bool(any_bad):
            if bool(bad_idx.any()):
                values = sorted(set(backend.to_device(idx[bad_idx], "cpu").tolist()))[:10]
                raise ValueError(f"token ids {values} are outside the vocabulary [0, {cfg.vocab_size})")
            values = sorted(set(backend.to_device(targets[bad_targets], "cpu").tolist()))[:10]
            raise ValueError(f"target ids {values} are outside the vocabulary [0, {cfg.vocab_size}) and are not ignore_index {IGNORE_INDEX}")

    def forward(self, idx, targets=None, kv_cache=None, rng=None):
        """idx int (B, T) [, targets int (B, T)] -> logits (B, T, V), loss (scalar Tensor or None).

        targets equal to -100 are ignored in the loss. rng drives dropout (needed in training mode
        when dropout > 0). With kv_cache, the tokens continue the cached ones and no graph is built.
        """
        xp = backend.array_module(self.transformer.wte.weight.data)
        idx, targets = (None if a is None else a.data if isinstance(a, Tensor) else
                        a if backend.is_cupy_array(a) else np.asarray(a) for a in (idx, targets))
        start = 0 if kv_cache is None else kv_cache.length
        # checked where the ids are: ids from the host (a NumPy batch) are checked there, before they are
        # copied to a GPU, which then need not finish its queue for the answer
        self._check_inputs(idx, targets, start)
        idx = xp.asarray(idx)
        targets = None if targets is None else xp.asarray(targets)
        if kv_cache is not None:
            if kv_cache.batch_size != idx.shape[0]:
                raise ValueError(f"kv_cache was made for batch size {kv_cache.batch_size}, idx has {idx.shape[0]} rows")
            with no_grad():
                out = self._forward(idx, targets, kv_cache, rng, start)
            kv_cache.length += idx.shape[1]
            return out
        return self._forward(idx, targets, None, rng, 0)

    def hidden_states(self, idx, rng=None):
        """idx int (B, T) -> (B, T, C): the final norm's output, what the LM head reads (a classifier's features)."""
        xp = backend.array_module(self.transformer.wte.weight.data)
        idx = idx.data if isinstance(idx, Tensor) else idx if backend.is_cupy_array(idx) else np.asarray(idx)
        self._check_inputs(idx, None, 0)
        with self._autocast():
            return self._hidden(xp.asarray(idx), None, rng, 0)

    def _autocast(self):
        """precision.autocast for a bfloat16 model (a ValueError where its device cannot run bf16: never a
        silent slow path), else nothing. The loss stays outside: cross-entropy is float32 either way."""
        if not precision.is_mixed(self.config.dtype):
            return contextlib.nullcontext()
        precision.check_supported(self.config.dtype, backend.device_of(self.transformer.wte.weight.data))
        return precision.autocast(self.config.dtype)

    def _forward(self, idx, targets, kv_cache, rng, start):
        with self._autocast():
            logits = self.lm_head(self._hidden(idx, kv_cache, rng, start))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.CrossEntropy._apply_prechecked(logits, targets, ignore_index=IGNORE_INDEX, reduction="mean")
        return logits, loss

    def _hidden(self, idx, kv_cache, rng, start):
        B, T = idx.shape
        tr = self.transformer
        # _check_inputs has checked idx and targets, and the positions are in range: the ops' own checks
        # (Function.check_inputs, F.embedding, F.cross_entropy) are skipped, each would be a wait for the GPU
        x = tr.wte._prechecked(idx)                                      # (B, T, C)
        if self.config.position == "learned":
            xp = backend.array_module(idx)
            x = x + tr.wpe._prechecked(xp.arange(start, start + T))          # + (T, C)
        x = tr.drop(x, rng)
        for layer, block in enumerate(tr.h):
            x = block(x, rng, kv_cache, layer)
        return tr.ln_f(x)                                                # (B, T, C)

    def load_state_dict(self, state, strict=True):
        """As Module.load_state_dict, also taking a Hugging Face GPT2Model dict (no "transformer."
        prefix) and skipping HF's causal-mask buffers (`h.{i}.attn.bias`, `h.{i}.attn.masked_bias`)."""
        names = list(state)
        if names and not any(n.startswith("transformer.") for n in names):
            state = {(n if n.startswith("lm_head.") else "transformer." + n): a for n, a in state.items()}
        state = {n: a for n, a in state.items() if not n.endswith((".attn.bias", ".attn.masked_bias"))}
        return super().load_state_dict(state, strict=strict)

    @classmethod
    def from_pretrained(cls, path, dtype="float32", device="cpu"):
        """A GPT from a Hugging Face folder (GPT-2 or Llama: config.json + safetensors), this project's
        training checkpoint file, or a training out_dir holding one (tinygrad_llm.hub)."""
        from .hub import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, tokenizer=None):
        """Write a folder that transformers.AutoModelForCausalLM.from_pretrained opens (GPT-2 layout for
        LayerNorm/GELU/learned positions, Llama layout for RMSNorm/SwiGLU/RoPE), with the tokenizer's files
        if given (tinygrad_llm.hub)."""
        from .hub import save_pretrained
        return save_pretrained(self, path, tokenizer=tokenizer)
