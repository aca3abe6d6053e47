"""Optimizers (AdamW, SGD), the cosine learning-rate schedule with warmup, and gradient clipping.

    optimizer = AdamW(param_groups(model, weight_decay=0.1), lr=1e-3, betas=(0.9, 0.99))
    for step in range(max_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, 1e-3, 1e-4, warmup_steps=100, max_steps=max_steps)
        logits, loss = model(x, y)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

The updates follow torch.optim exactly (same formulas, same order of operations), so a run here
and a run in PyTorch from the same weights agree to rounding. They change the parameter arrays in
place (`p.data`), outside the graph.
"""
import math

import numpy as np

from . import backend
from .tensor import Tensor


def param_groups(model, weight_decay):
    """Two groups for AdamW: 2-D and larger weights (matmuls, embeddings) decay; 1-D ones (biases,
    norm weights) do not (the nanoGPT / torch convention). Tied weights appear once."""
    params = model.parameters()
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Optimizer:
    """Parameter groups with per-group hyperparameters, per-parameter state, zero_grad, state dicts.

    params: a list of Tensors, or a list of dicts {"params": [...], <overrides>}. A Tensor given twice
    (tied weights) is kept once, in the first group that names it. `group["lr"]` may be changed
    between steps (schedules).
    """

    def __init__(self, params, defaults):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        seen = set()
        self.param_groups = []
        for group in groups:
            unknown = set(group) - set(defaults) - {"params"}
            if unknown:
                raise ValueError(f"{type(self).__name__}: unknown group options {sorted(unknown)}; known: {sorted(defaults)}")
            kept = []
            for p in group["params"]:
                if not isinstance(p, Tensor) or not p.requires_grad:
                    raise TypeError(f"{type(self).__name__}: parameters must be Tensors with requires_grad=True, got {type(p).__name__}")
                if id(p) not in seen:
                    seen.add(id(p))
                    kept.append(p)
            self.param_groups.append({**defaults, **group, "params": kept})
        self.state = {}  # id(p) -> dict of per-parameter state

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self):
        """Drop every parameter's gradient (set to None, as torch's default)."""
        for p in self._params():
            p.grad = None

    @property
    def lr(self):
        """The first group's learning rate (setting it sets every group's)."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        for group in self.param_groups:
            group["lr"] = value

    def state_dict(self):
        """{"state": {index: {"step": int, name: numpy array}}, "param_groups": [hyperparameters + "params": indices]}.

        Parameters are numbered in group order (as torch does); arrays are CPU copies, numbers plain Python.
        """
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {}
        for p in self._params():
            if id(p) in self.state:
                state[index[id(p)]] = {k: (np.array(backend.to_device(v, "cpu"), copy=True) if hasattr(v, "shape") else v)
                                       for k, v in self.state[id(p)].items()}
        groups = []
        for group in self.param_groups:
            g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            g["params"] = [index[id(p)] for p in group["params"]]
            groups.append(g)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyperparameters and state saved by state_dict (keys may be ints or strings)."""
        self.check_state_dict(state_dict)
        groups = state_dict["param_groups"]
        params = self._params()
        saved = {int(i): s for i, s in state_dict["state"].items()}
        for group, g in zip(self.param_groups, groups):
            for k, v in g.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(v, list) else v
        self.state = {}
        for i, s in saved.items():
            p = params[i]
            xp = backend.array_module(p.data)
            self.state[id(p)] = {k: (xp.array(v, dtype=p.dtype) if hasattr(v, "shape") else int(v) if k == "step" else v)
                                 for k, v in s.items()}

    def check_state_dict(self, state_dict):
        """Raise ValueError if state_dict does not fit this optimizer's groups and parameters; change nothing."""
        groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [len(g["params"]) for g in groups] != sizes:
            raise ValueError(f"{type(self).__name__}.load_state_dict: saved groups hold {[len(g['params']) for g in groups]} "
                             f"parameters, this optimizer's hold {sizes}")
        params = self._params()
        saved = {int(i): s for i, s in state_dict["state"].items()}
        for i, s in saved.items():
            if not 0 <= i < len(params):
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for parameter {i}, but there are {len(params)}")
            for name, value in s.items():
                if hasattr(value, "shape") and tuple(value.shape) != params[i].shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {name} of parameter {i} has shape "
                                     f"{tuple(value.shape)}, the parameter has shape {params[i].shape}")


@backend.kernels(cpu="optim.adamw_update_numba", cuda="optim.adamw_update_cuda")
def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step on arrays, in place (torch.optim.AdamW's formulas and order). step counts from 1."""
    xp = backend.array_module(p)
    # decoupled weight decay: shrink the weights first, apart from the gradient
    p *= 1 - lr * weight_decay
    # m = beta1 m + (1 - beta1) g, as torch's lerp; v = beta2 v + (1 - beta2) g^2
    m += (1 - beta1) * (g - m)
    v *= beta2
    v += (1 - beta2) * g * g
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = xp.sqrt(v) / math.sqrt(bias_correction2) + eps
    p -= (lr / bias_correction1) * (m / denom)


@backend.kernels(cpu="optim.adamw_update_group_numba", cuda="optim.adamw_update_group_cuda")
def adamw_update_group(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    """adamw_update over lists of arrays sharing one step count (a parameter group); a GPU kernel does
    them all in one launch (kernels/cuda/optim.py), here each array goes to adamw_update (or its kernel)."""
    for p, g, m, v in zip(ps, gs, ms, vs):
        backend.accelerated(adamw_update, p)(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)


class AdamW(Optimizer):
    """torch.optim.AdamW: decoupled weight decay, bias-corrected moments (defaults as torch's).

    A plain list of parameters decays all of them, as torch does; `param_groups(model, wd)` gives the
    usual split (no decay on biases and norm weights). The update is `adamw_update`, served by a
    kernel through backend.accelerated when the op names one.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self):
        """Update every parameter that has a gradient (those without one are skipped, as in torch)."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            by_step = {}   # step count -> [p], g, m, v lists: one group update each (normally one step count)
            for p in group["params"]:
                if p.grad is None:
                    continue
                xp = backend.array_module(p.data)
                state = self.state.get(id(p))
                if state is None:
                    state = self.state[id(p)] = {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
                state["step"] += 1
                lists = by_step.setdefault(state["step"], ([], [], [], []))
                for arrays, a in zip(lists, (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    arrays.append(a)
            for step, (ps, gs, ms, vs) in by_step.items():
                backend.accelerated(adamw_update_group, ps[0])(ps, gs, ms, vs, *hyper, step)


class SGD(Optimizer):
    """torch.optim.SGD: g += wd p; with momentum, buf = momentum buf + g (buf = g on the first step); p -= lr buf."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self):
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + weight_decay * p.data if weight_decay else p.grad
                if momentum:
                    if id(p) not in self.state:
                        self.state[id(p)] = {"momentum_buffer": g.copy()}
                    else:
                        buf = self.state[id(p)]["momentum_buffer"]
                        buf *= momentum
                        buf += g
                    g = self.state[id(p)]["momentum_buffer"]
                p.data -= lr * g


def cosine_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Learning rate at `step` (from 0): linear warmup max_lr (step+1)/warmup_steps, then cosine down to
    min_lr at max_steps, then min_lr.

    >>> cosine_lr(0, 1e-3, 1e-4, 10, 100), cosine_lr(55, 1e-3, 1e-4, 10, 100), cosine_lr(500, 1e-3, 1e-4, 10, 100)
    (0.0001, 0.00055, 0.0001)
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)   # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def clip_grad_norm(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm; returns the norm before.

    As torch.nn.utils.clip_grad_norm_: total = ||(||g_1||, ||g_2||, ...)||, every g *= min(1, max_norm/(total + 1e-6)).
    On the CPU the norm is a Python float. On a GPU it is a 0-d device array and nothing waits for it
    (the coefficient is computed and applied on the device, as torch does): float(norm) or
    math.isfinite(norm) syncs when the caller needs the value.
    """
    grads = []
    seen = set()
    for p in params:
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            grads.append(p.grad)
    if not grads:
        return 0.0
    return backend.accelerated(clip_grads, grads[0])(grads, max_norm)


@backend.kernels(cuda="optim.clip_grads_cuda")
def clip_grads(grads, max_norm):
    """clip_grad_norm's work on the arrays (a kernel may serve it): scales grads in place, returns the norm."""
    xp = backend.array_module(grads[0])
    norms = xp.stack([xp.linalg.norm(g.reshape(-1)) for g in grads])
    if xp is np:
        total = float(xp.linalg.norm(norms))
        clip_coef = max_norm / (total + 1e-6)
        if clip_coef < 1:
            for g in grads:
                g *= g.dtype.type(clip_coef)
        return total
    # on a GPU: no host sync; the coefficient stays on the device and multiplies every g (by 1 when unclipped)
    total = xp.linalg.norm(norms)
    clip_coef = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g *= clip_coef.astype(g.dtype)
    return total
