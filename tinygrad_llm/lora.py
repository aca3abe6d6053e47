"""LoRA: low-rank adapters on a model's linears (and, if asked, its embeddings), everything else frozen.

    apply_lora(model, rank=8, alpha=16)           # every c_attn, c_proj, c_fc gets lora_A (in, r), lora_B (r, out)
    apply_lora(model, 8, 16, targets=("c_attn", "c_proj", "c_fc", "wte", "wpe"))   # the embedding tables too
    ... train: only the adapters (and whatever the caller unfreezes again, e.g. a new head) have gradients ...
    merge_lora(model)                             # w += (alpha / r) A B, adapters removed: a plain model again

A linear with an adapter computes x W + b + (alpha/r) x A B (functional.lora_linear, one op with a
handwritten backward, docs/backward/lora_linear.md). An embedding table W (V, C) with an adapter looks rows up in
W + (alpha/r) A B, with A (V, r) and B (r, C): W[idx] + (alpha/r) A[idx] B, made of the embedding and linear
ops (their backward scatters into the rows of A that were looked up); an LM head tied to that table
multiplies by the same sum, so merging changes no logit. A starts small and random, B at zero, so the
adapted model starts as exactly the base model. Frozen parameters have requires_grad False: the ops skip their weight
gradients (each backward computes only what `ctx.needs_input_grad` asks for), so they cost neither
gradient memory nor the (IN, OUT) weight products. A frozen Tensor is not listed by named_parameters(),
so a state_dict() of an adapted model holds only the trainable arrays: what a LoRA run saves.
"""
import math

import numpy as np

from . import backend
from . import functional as F
from .model import LMHead
from .nn import Embedding, Linear
from .tensor import Tensor, no_grad

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")


class LoRALinear(Linear):
    """A Linear with an adapter: (..., IN) -> (..., OUT), x W + b + scale x A B with scale = alpha / rank.

    apply_lora turns a Linear into one in place (its class is swapped, its Tensors stay the same objects),
    merge_lora turns it back.
    """

    def forward(self, x):
        return F.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, scale=self.lora_scale)


class LoRAEmbedding(Embedding):
    """An Embedding with an adapter: int (...) -> (..., C), W[idx] + scale A[idx] B with scale = alpha / rank."""

    def forward(self, idx):
        return self._rows(idx, F.embedding)

    def _prechecked(self, idx):
        return self._rows(idx, F.Embedding._apply_prechecked)

    def _rows(self, idx, lookup):
        return lookup(idx, self.weight) + F.linear(lookup(idx, self.lora_A), self.lora_B) * self.lora_scale


class LoRALMHead(LMHead):
    """The LM head of a model whose tied embedding table has an adapter: (B, T, C) -> (B, T, V),
    x (W + scale A B)^T = x W^T + scale (x B^T) A^T, so that merging the adapter (which changes the shared
    W) leaves the logits as they were. apply_lora turns the tied LMHead into one in place and gives it
    `_table`: the embedding module in a tuple, not a submodule, so its Tensors are named once, under the
    embedding."""

    def forward(self, x):
        e = self._table[0]
        return F.linear(x, self.weight.T) + F.linear(F.linear(x, e.lora_B.T), e.lora_A.T) * e.lora_scale


def _check(rank, alpha):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")


def lora_modules(model):
    """(name, module) for every adapted linear and embedding of `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]


def lora_linears(model):
    """(name, LoRALinear) for every adapted linear of `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _tied_head(model, embedding):
    """The LMHead of `model` whose weight is `embedding`'s table (a tied LM head), or None."""
    for _, m in model.named_modules():
        if type(m) is LMHead and m.weight is embedding.weight:
            return m
    return None


def apply_lora(model, rank, alpha, targets=DEFAULT_TARGETS, rng=None):
    """Add adapters to every Linear or Embedding whose attribute name is in `targets`; freeze every other
    parameter.

    lora_A (IN, rank) ~ U(-1/sqrt(IN), 1/sqrt(IN)) (torch's default Linear init), lora_B (rank, OUT) zeros,
    named `<module name>.lora_A` / `.lora_B`; for an embedding table (V, C), IN = V and OUT = C (a lookup is
    a product with a one-hot row). rng: an np.random.Generator (default seed 0). Returns the model.
    Raises, changing nothing, when the arguments are bad, nothing matches or the model already has adapters.
    """
    _check(rank, alpha)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora first)")
    chosen = [(name, m) for name, m in model.named_modules()
              if type(m) in (Linear, Embedding) and name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        raise ValueError(f"apply_lora: no Linear or Embedding named any of {list(targets)} in {type(model).__name__}")
    too_big = [(name, m.weight.shape) for name, m in chosen if rank > min(m.weight.shape)]
    if too_big:
        raise ValueError(f"apply_lora: rank {rank} exceeds the smaller side of {too_big[0][0]}.weight {too_big[0][1]}")
    rng = np.random.default_rng(0) if rng is None else rng
    for p in model.parameters():
        p.requires_grad = False
    for _, m in chosen:
        IN, OUT = m.weight.shape
        bound = 1 / math.sqrt(IN)
        A = rng.uniform(-bound, bound, (IN, rank)).astype(m.weight.dtype)
        m.lora_A = Tensor(backend.to_device(A, m.weight.device), requires_grad=True)
        m.lora_B = Tensor(backend.to_device(np.zeros((rank, OUT), dtype=m.weight.dtype), m.weight.device), requires_grad=True)
        m.lora_scale = float(alpha) / rank
        m.lora_rank, m.lora_alpha = int(rank), float(alpha)
        if type(m) is Embedding:
            head = _tied_head(model, m)
            if head is not None:
                head.__class__, head._table = LoRALMHead, (m,)
            m.__class__ = LoRAEmbedding
        else:
            m.__class__ = LoRALinear
    return model


@no_grad()
def merge_lora(model):
    """Fold each adapter into its weight (w += scale A B), remove the adapters, and make every parameter
    trainable again (requires_grad True). The logits stay the same up to rounding. Returns the model."""
    adapted = lora_modules(model)
    if not adapted:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    for _, m in adapted:
        m.weight.data += (m.lora_A.data @ m.lora_B.data) * m.weight.dtype.type(m.lora_scale)
        del m.lora_A, m.lora_B, m.lora_scale, m.lora_rank, m.lora_alpha
        m.__class__ = Embedding if isinstance(m, LoRAEmbedding) else Linear
    for _, module in model.named_modules():
        if isinstance(module, LoRALMHead):
            del module._table
            module.__class__ = LMHead
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.dtype.kind == "f" and value._ctx is None:
                value.requires_grad = True
    return model

