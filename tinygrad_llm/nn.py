"""Modules: containers of parameters (Tensors with requires_grad) with PyTorch's naming and state dicts.

    block = Linear(768, 3 * 768, rng=np.random.default_rng(0))   # weight (768, 2304), bias (2304,)
    block.state_dict()        # {"weight": array (768, 2304), "bias": array (2304,)}

A Module finds its parameters and submodules by looking at its own attributes, in the order they were
set, so names come out as in PyTorch: `transformer.h.0.attn.c_attn.weight`. A Tensor held by two
modules (tied embeddings) is ONE parameter: parameters() lists it once, and its gradient sums both uses.

Weights follow GPT-2's checkpoints: Linear keeps its weight as (in, out), the layout of GPT-2's Conv1D
and of the papers' y = xW + b, so a GPT-2 state dict loads with no transposing.
"""
import numpy as np

from . import backend
from . import functional as F
from .tensor import Tensor


class Module:
    """Base class: parameters, names, state dicts, train/eval, device moves.

    Subclasses set parameters (Tensors with requires_grad=True) and submodules as attributes in
    __init__ and define forward(); calling the module calls forward.
    """

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} defines no forward()")

    # ---- walking the tree ----------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix=""):
        """(dotted name, module) for self and every submodule, depth first in attribute order."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def _named_tensors(self):
        """Every (dotted name, parameter) pair, tied parameters under each of their names."""
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Tensor) and value.requires_grad:
                    yield (f"{prefix}.{name}" if prefix else name), value

    def named_parameters(self):
        """(name, parameter) pairs; a tied parameter appears once, under the first name that holds it."""
        seen = set()
        for name, p in self._named_tensors():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def parameters(self):
        """The parameters, each once (deduplicated by identity), in a fixed order."""
        return [p for _, p in self.named_parameters()]

    # ---- state dicts ---------------------------------------------------------------------------
    def state_dict(self):
        """{name: numpy array} for every parameter name, tied ones under each name (as torch does).

        The arrays are copies on the CPU: a snapshot that later training does not change.
        """
        return {name: np.array(backend.to_device(p.data, "cpu"), copy=True) for name, p in self._named_tensors()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays from `state` into the parameters (in place: the same Tensor objects stay).

        Everything is checked before anything changes. Shape mismatches always raise; with strict=True
        missing and unexpected keys raise too. A tied parameter counts as present when the dict holds
        any one of its names. Returns (missing, unexpected) lists of names.
        """
        named = dict(self._named_tensors())
        given = {name: np.asarray(value.numpy() if isinstance(value, Tensor) else backend.to_device(value, "cpu"))
                 for name, value in state.items()}
        covered = {id(named[name]) for name in given if name in named}
        missing = [name for name, p in named.items() if id(p) not in covered]
        unexpected = [name for name in given if name not in named]
        mismatched = [f"{name}: checkpoint {given[name].shape}, model {named[name].shape}"
                      for name in given if name in named and given[name].shape != named[name].shape]
        problems = []
        if mismatched:
            problems.append("shape mismatch for " + "; ".join(mismatched))
        if strict and missing:
            problems.append("missing keys " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys " + ", ".join(unexpected))
        # Two names of one tied parameter must not carry different values.
        first_name = {}
        for name in given:
            if name in named and not mismatched:
                other = first_name.setdefault(id(named[name]), name)
                if other != name and not np.array_equal(given[other], given[name]):
                    problems.append(f"{other} and {name} are tied in the model but differ in the state dict")
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__}: " + "; ".join(problems))
        for name, array in given.items():
            if name in named:
                p = named[name]
                xp = backend.array_module(p.data)
                p.data[...] = xp.asarray(array, dtype=p.dtype)
        return missing, unexpected

    # ---- modes, gradients, devices -------------------------------------------------------------
    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        """Drop every parameter's gradient (set to None, as torch's default)."""
        for p in self.parameters():
            p.grad = None

    def to(self, device):
        """Move every parameter (and gradient) to "cpu" or "cuda" in place; the Tensor objects stay the same."""
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        return self

    @property
    def device(self):
        params = self.parameters()
        return params[0].device if params else "cpu"


class ModuleList(Module):
    """A list of modules named 0, 1, 2, ... (GPT-2's `transformer.h.{i}`)."""

    def __init__(self, modules):
        for i, module in enumerate(modules):
            setattr(self, str(i), module)

    def __len__(self):
        return sum(1 for _ in self.named_children())

    def __iter__(self):
        return (module for _, module in self.named_children())

    def __getitem__(self, i):
        return getattr(self, str(range(len(self))[i]))


class ModuleDict(Module):
    """Named submodules given as keyword arguments (GPT-2's `transformer.wte`, `transformer.h`, ...)."""

    def __init__(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)


def _normal(rng, shape, std, dtype):
    return Tensor((rng.standard_normal(shape) * std).astype(dtype), requires_grad=True)


class Linear(Module):
    """(..., IN) -> (..., OUT): y = x W + b with W of shape (IN, OUT) (GPT-2's Conv1D layout), init N(0, std)."""

    def __init__(self, in_features, out_features, bias=True, *, rng, std=0.02, dtype="float32"):
        self.weight = _normal(rng, (in_features, out_features), std, dtype)
        self.bias = Tensor(np.zeros(out_features, dtype=dtype), requires_grad=True) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    """int (...) -> (..., C): rows of a (V, C) table, init N(0, std)."""

    def __init__(self, num_embeddings, embedding_dim, *, rng, std=0.02, dtype="float32"):
        self.weight = _normal(rng, (num_embeddings, embedding_dim), std, dtype)

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def _prechecked(self, idx):
        """forward for ids already checked to be in range (the model's fast path: no check, no device sync)."""
        return F.Embedding._apply_prechecked(idx, self.weight)


class LayerNorm(Module):
    """(..., C) -> (..., C): normalize over C, then scale by weight (init 1) and shift by bias (init 0)."""

    def __init__(self, dim, eps=1e-5, bias=True, dtype="float32"):
        self.eps = eps
        self.weight = Tensor(np.ones(dim, dtype=dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(dim, dtype=dtype), requires_grad=True) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)


class RMSNorm(Module):
    """(..., C) -> (..., C): x / sqrt(mean(x^2) + eps) * weight (init 1); no centering, no bias."""

    def __init__(self, dim, eps=1e-5, dtype="float32"):
        self.eps = eps
        self.weight = Tensor(np.ones(dim, dtype=dtype), requires_grad=True)

    def forward(self, x):
        return F.rms_norm(x, self.weight, eps=self.eps)


class Dropout(Module):
    """(...) -> (...): in training, zero each element with probability p and scale the rest by 1/(1-p).

    The random generator is passed at call time (one seeded np.random.Generator drives a whole run).
    In eval mode, or with p == 0, it is the identity and needs no generator. With `residual` (a tensor of
    x's shape and dtype) it returns residual + dropout(x) as one op (F.dropout_add: the same mask).
    """

    def __init__(self, p=0.0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x, rng=None, residual=None):
        if residual is not None:
            return F.dropout_add(residual, x, self.p, self.training, rng)
        return F.dropout(x, self.p, self.training, rng)
