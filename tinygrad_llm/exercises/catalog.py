"""The exercises: one entry each, with the forward written, the backward to fill, hints and a reference.

An entry holds source text (the forward method, the reference backward body, and a few classic
mistakes used by the tests), the hints (the steps of the derivation on the op's docs/backward page),
a strategy drawing the forward's positional inputs, and the library op that grades the learner.
"""
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from .. import functional as F
from ..testing import elements, token_ids


@dataclass
class Exercise:
    name: str
    cls: str                  # the Function subclass the learner's file defines
    description: str          # one line, for `list`
    page: str                 # docs/backward/<page>
    contract: str             # shapes of inputs and output
    saved: str                # what forward leaves on ctx
    inputs: tuple             # forward's positional parameter names, in order
    forward: str              # the forward method's source (indented 4 spaces, inside the class)
    solution: str             # the backward body (indented 8 spaces)
    returns: str              # what backward returns, in words
    hints: list               # the derivation, one step each
    draw: object              # a hypothesis strategy of input tuples (arrays; integer ones get no gradient)
    reference: object         # tinygrad_llm op on Tensors, same positional inputs: the grader
    mistakes: dict = field(default_factory=dict)  # label -> (backward body, input whose gradient goes wrong)


def _dims(*sides):
    return st.tuples(*[st.integers(1, n) if isinstance(n, int) else n for n in sides])


def _array(shape, lo=-10.0, hi=10.0):
    from hypothesis.extra import numpy as hnp
    return hnp.arrays(np.float64, shape, elements=elements(lo, hi))


@st.composite
def _linear_inputs(draw):
    B, T, IN, OUT = draw(_dims(2, 3, 4, 4))
    return draw(_array((B, T, IN))), draw(_array((IN, OUT))), draw(_array((OUT,)))


@st.composite
def _embedding_inputs(draw):
    B, T, V, C = draw(_dims(2, 4, 4, 3))
    return draw(token_ids(V, (B, T))), draw(_array((V, C)))


@st.composite
def _unary_inputs(draw, lo=-10.0, hi=10.0):
    return (draw(_array(draw(_dims(2, 3, 4)), lo, hi)),)


@st.composite
def _norm_inputs(draw, bias=True):
    B, T, C = draw(_dims(2, 3, 5))
    arrays = (draw(_array((B, T, C))), draw(_array((C,))))
    return arrays + (draw(_array((C,))),) if bias else arrays


@st.composite
def _cross_entropy_inputs(draw):
    N, V = draw(_dims(4, 4))
    V += 1
    targets = np.array(draw(st.lists(st.integers(-1, V - 1), min_size=N, max_size=N)), dtype=np.int64)
    return draw(_array((N, V))), np.where(targets < 0, -100, targets)


@st.composite
def _attention_inputs(draw):
    B, NH, T, HS = draw(_dims(2, 2, 4, 4))
    return tuple(draw(_array((B, NH, T, HS), -3.0, 3.0)) for _ in range(3))


@st.composite
def _rope_inputs(draw):
    B, NH, T, half = draw(_dims(2, 2, 4, 3))
    start = draw(st.integers(0, 50))
    return draw(_array((B, NH, T, 2 * half))), np.arange(start, start + T, dtype=np.int64)


@st.composite
def _swiglu_inputs(draw):
    shape = draw(_dims(2, 3, 4))
    return draw(_array(shape)), draw(_array(shape))


EXERCISES = {}


def _add(exercise):
    EXERCISES[exercise.name] = exercise


_add(Exercise(
    name="linear", cls="Linear", page="linear.md",
    description="out = x w + b, w stored (in, out): two matrix products and a sum",
    contract="x (B, T, IN), w (IN, OUT), b (OUT,) -> out (B, T, OUT)",
    saved="ctx.x (B, T, IN) and ctx.w (IN, OUT)",
    inputs=("x", "w", "b"), returns="dx, dw, db",
    forward='''    @staticmethod
    def forward(ctx, x, w, b):
        ctx.x, ctx.w = x, w
        return x @ w + b
''',
    solution='''        x, w = ctx.x, ctx.w
        dout2 = dout.reshape(-1, dout.shape[-1])          # (B*T, OUT)
        dx = (dout2 @ w.T).reshape(x.shape)               # dout w^T
        dw = x.reshape(-1, x.shape[-1]).T @ dout2         # x^T dout, summed over every row
        db = dout2.sum(axis=0)                            # b is added to every row
        return dx, dw, db
''',
    hints=[
        "Write the forward element by element: out[n, o] = sum_i x[n, i] w[i, o] + b[o], with n running over "
        "the B*T rows (flatten x to (B*T, IN) and dout to (B*T, OUT)).",
        "d out[n, o] / d x[n, i] = w[i, o]. Contract with dout: dx[n, i] = sum_o dout[n, o] w[i, o], "
        "the matrix product dout w^T, (N, OUT)(OUT, IN) -> (N, IN); reshape back to x's shape.",
        "d out[n, o] / d w[i, o] = x[n, i], and w is used by every row n, so its gradient sums over n: "
        "dw[i, o] = sum_n x[n, i] dout[n, o], the product x^T dout, (IN, N)(N, OUT) -> (IN, OUT).",
        "d out[n, o] / d b[o] = 1 for every row: db = dout summed over all rows, shape (OUT,).",
    ],
    draw=_linear_inputs(), reference=F.linear,
    mistakes={
        "weight gradient transposed": ('''        x, w = ctx.x, ctx.w
        dout2, x2 = dout.reshape(-1, dout.shape[-1]), ctx.x.reshape(-1, ctx.x.shape[-1])
        return (dout2 @ w.T).reshape(x.shape), dout2.T @ x2, dout2.sum(axis=0)
''', "w"),
        "bias gradient not summed over the rows": ('''        x, w = ctx.x, ctx.w
        dout2, x2 = dout.reshape(-1, dout.shape[-1]), ctx.x.reshape(-1, ctx.x.shape[-1])
        return (dout2 @ w.T).reshape(x.shape), x2.T @ dout2, dout
''', "b"),
    },
))

_add(Exercise(
    name="embedding", cls="Embedding", page="embedding.md",
    description="out = w[idx], a row lookup: the gradient scatters back, and repeated ids add",
    contract="idx int (B, T), w (V, C) -> out (B, T, C)",
    saved="ctx.idx (B, T) int and ctx.w_shape (V, C)",
    inputs=("idx", "w"), returns="None for idx (integers have no gradient), dw",
    forward='''    @staticmethod
    def forward(ctx, idx, w):
        ctx.idx, ctx.w_shape = idx, w.shape
        return w[idx]
''',
    solution='''        dw = np.zeros(ctx.w_shape)
        # row v of dw sums dout over every position holding v: np.add.at accumulates repeated ids
        np.add.at(dw, ctx.idx.reshape(-1), dout.reshape(-1, ctx.w_shape[1]))
        return None, dw
''',
    hints=[
        "The lookup is a product with a one-hot matrix: out = onehot(idx) w, onehot of shape (B*T, V).",
        "So dw = onehot(idx)^T dout: row v of dw is the sum of dout[b, t, :] over every (b, t) with idx[b, t] == v; "
        "rows of tokens that never occur stay 0.",
        "A token that appears twice must get both contributions. In NumPy, dw[idx] = dout and even dw[idx] += dout "
        "keep only one of them; np.add.at(dw, idx, rows) adds every one.",
        "idx holds integers: return None as its gradient, then dw.",
    ],
    draw=_embedding_inputs(), reference=lambda idx, w: F.embedding(idx, w),
    mistakes={
        "repeated ids overwrite instead of adding": ('''        dw = np.zeros(ctx.w_shape)
        dw[ctx.idx.reshape(-1)] = dout.reshape(-1, ctx.w_shape[1])
        return None, dw
''', "w"),
    },
))

_add(Exercise(
    name="gelu", cls="GELU", page="gelu.md",
    description="GPT-2's tanh-approximated GELU, 0.5 x (1 + tanh(u)): product and chain rule",
    contract="x (any shape) -> out (same shape), elementwise",
    saved="ctx.x and ctx.t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3)",
    inputs=("x",), returns="dx",
    forward='''    @staticmethod
    def forward(ctx, x):
        u = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
        ctx.x, ctx.t = x, np.tanh(u)
        return 0.5 * x * (1 + ctx.t)
''',
    solution='''        x, t = ctx.x, ctx.t
        du_dx = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx)
''',
    hints=[
        "Elementwise op: dx = dout * d out/dx at each element, no sums.",
        "out = 0.5 x (1 + t) with t = tanh(u): the product rule gives 0.5 (1 + t) + 0.5 x dt/dx.",
        "dt/dx = (1 - t^2) du/dx, since tanh' = 1 - tanh^2.",
        "du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).",
    ],
    draw=_unary_inputs(), reference=lambda x: F.gelu(x, approximate="tanh"),
    mistakes={
        "product rule: only the 0.5 (1 + t) term": ('''        return dout * 0.5 * (1 + ctx.t)
''', "x"),
    },
))

_add(Exercise(
    name="silu", cls="SiLU", page="silu_and_swiglu.md",
    description="x sigmoid(x), the activation inside SwiGLU",
    contract="x (any shape) -> out (same shape), elementwise",
    saved="ctx.x and ctx.sig = sigmoid(x)",
    inputs=("x",), returns="dx",
    forward='''    @staticmethod
    def forward(ctx, x):
        ctx.x, ctx.sig = x, 1 / (1 + np.exp(-x))
        return x * ctx.sig
''',
    solution='''        sig = ctx.sig
        return dout * sig * (1 + ctx.x * (1 - sig))
''',
    hints=[
        "out = x sig(x): the product rule gives sig + x sig'.",
        "sig' = sig (1 - sig), so d out/dx = sig (1 + x (1 - sig)); multiply by dout.",
    ],
    draw=_unary_inputs(), reference=F.silu,
    mistakes={"derivative of sigmoid only": ('''        return dout * ctx.sig * (1 - ctx.sig)
''', "x")},
))

_add(Exercise(
    name="layer_norm", cls="LayerNorm", page="layer_norm.md",
    description="normalise each row over the last axis, then scale and shift: the mean terms are the trap",
    contract="x (B, T, C), w (C,), b (C,) -> out (B, T, C)",
    saved="ctx.xhat (B, T, C) (the normalised x), ctx.rstd (B, T, 1) = 1/sqrt(var + eps), ctx.w (C,)",
    inputs=("x", "w", "b"), returns="dx, dw, db",
    forward='''    @staticmethod
    def forward(ctx, x, w, b, eps=1e-5):
        mean = x.mean(axis=-1, keepdims=True)
        rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
        ctx.xhat, ctx.rstd, ctx.w = (x - mean) * rstd, rstd, w
        return ctx.xhat * w + b
''',
    solution='''        xhat, rstd = ctx.xhat, ctx.rstd
        C = xhat.shape[-1]
        dw = (dout * xhat).reshape(-1, C).sum(axis=0)
        db = dout.reshape(-1, C).sum(axis=0)
        dxhat = dout * ctx.w
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                     - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, dw, db
''',
    hints=[
        "Parameters first: out_i = xhat_i w_i + b_i and w, b are shared by every (b, t), so dw = sum over B and T "
        "of dout * xhat and db = sum over B and T of dout, both (C,).",
        "Through the affine step: dxhat_i = dout_i * w_i.",
        "xhat_i = (x_i - mean) * rstd depends on x_j directly AND through mean and rstd: "
        "d xhat_i / d x_j = rstd (delta_ij - 1/C) + (x_i - mean) d rstd / d x_j.",
        "d var / d x_j = (2/C)(x_j - mean), so d rstd / d x_j = -(rstd^2 / C) xhat_j, and "
        "d xhat_i / d x_j = rstd (delta_ij - 1/C - xhat_i xhat_j / C).",
        "Contract with dxhat over i: dx_j = rstd (dxhat_j - mean_i(dxhat_i) - xhat_j mean_i(dxhat_i xhat_i)); "
        "the means are over the last axis with keepdims.",
    ],
    draw=_norm_inputs(), reference=lambda x, w, b: F.layer_norm(x, w, b),
    mistakes={
        "no mean terms (as if mean and rstd were constants)": ('''        C = ctx.xhat.shape[-1]
        dw = (dout * ctx.xhat).reshape(-1, C).sum(axis=0)
        return ctx.rstd * dout * ctx.w, dw, dout.reshape(-1, C).sum(axis=0)
''', "x"),
        "dw not summed over the batch": ('''        xhat, rstd = ctx.xhat, ctx.rstd
        dxhat = dout * ctx.w
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, dout * xhat, dout.reshape(-1, xhat.shape[-1]).sum(axis=0)
''', "w"),
    },
))

_add(Exercise(
    name="rms_norm", cls="RMSNorm", page="rms_norm.md",
    description="x / rms(x) * w over the last axis: layer_norm without the centring",
    contract="x (B, T, C), w (C,) -> out (B, T, C)",
    saved="ctx.x (B, T, C), ctx.rstd (B, T, 1) = 1/sqrt(mean(x^2) + eps), ctx.w (C,)",
    inputs=("x", "w"), returns="dx, dw",
    forward='''    @staticmethod
    def forward(ctx, x, w, eps=1e-5):
        ctx.rstd = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        ctx.x, ctx.w = x, w
        return x * ctx.rstd * w
''',
    solution='''        xhat = ctx.x * ctx.rstd
        dw = (dout * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
        dxhat = dout * ctx.w
        dx = ctx.rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, dw
''',
    hints=[
        "dw = sum over B and T of dout * xhat (w is broadcast over them), with xhat = x * rstd; dxhat = dout * w.",
        "d rstd / d x_j = -1/2 (ms + eps)^(-3/2) (2 x_j / C) = -(rstd^2 / C) xhat_j, where ms = mean(x^2).",
        "d xhat_i / d x_j = rstd delta_ij + x_i d rstd / d x_j = rstd (delta_ij - xhat_i xhat_j / C).",
        "Contract with dxhat: dx_j = rstd (dxhat_j - xhat_j mean_i(dxhat_i xhat_i)). Unlike layer_norm there is "
        "no -mean(dxhat) term: no mean was subtracted in the forward.",
    ],
    draw=_norm_inputs(bias=False), reference=lambda x, w: F.rms_norm(x, w, eps=1e-5),
    mistakes={
        "layer_norm's formula (an extra -mean(dxhat) term)": ('''        xhat = ctx.x * ctx.rstd
        dxhat = dout * ctx.w
        dx = ctx.rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, (dout * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
''', "x"),
    },
))

_add(Exercise(
    name="softmax", cls="Softmax", page="softmax_and_log_softmax.md",
    description="probabilities along the last axis: a Jacobian you never need to build",
    contract="x (..., N) -> p (..., N), along the last axis",
    saved="ctx.p (..., N), the output",
    inputs=("x",), returns="dx",
    forward='''    @staticmethod
    def forward(ctx, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        ctx.p = e / e.sum(axis=-1, keepdims=True)
        return ctx.p
''',
    solution='''        p = ctx.p
        return p * (dout - (dout * p).sum(axis=-1, keepdims=True))
''',
    hints=[
        "p_i = e_i / S with S = sum_k e_k; the max subtracted in the forward is a constant shift, no gradient.",
        "d p_i / d x_j = p_i (delta_ij - p_j): the Jacobian diag(p) - p p^T.",
        "Contract with dout: dx_j = sum_i dout_i p_i (delta_ij - p_j) = p_j (dout_j - sum_i dout_i p_i). "
        "The sum is over the last axis, with keepdims.",
    ],
    draw=_unary_inputs(), reference=lambda x: F.softmax(x),
    mistakes={"no subtraction (only the diagonal of the Jacobian)": ('''        return ctx.p * dout
''', "x")},
))

_add(Exercise(
    name="log_softmax", cls="LogSoftmax", page="softmax_and_log_softmax.md",
    description="log-probabilities along the last axis",
    contract="x (..., N) -> out (..., N), along the last axis",
    saved="ctx.out (..., N), the output (log-probabilities)",
    inputs=("x",), returns="dx",
    forward='''    @staticmethod
    def forward(ctx, x):
        shifted = x - x.max(axis=-1, keepdims=True)
        ctx.out = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return ctx.out
''',
    solution='''        return dout - np.exp(ctx.out) * dout.sum(axis=-1, keepdims=True)
''',
    hints=[
        "out_i = x_i - log S, S = sum_k exp(x_k): d out_i / d x_j = delta_ij - p_j with p = softmax(x) = exp(out).",
        "Contract with dout: dx_j = dout_j - p_j sum_i dout_i (sum over the last axis, keepdims).",
    ],
    draw=_unary_inputs(), reference=lambda x: F.log_softmax(x),
    mistakes={"p instead of p times the sum of dout": ('''        return dout - np.exp(ctx.out)
''', "x")},
))

_add(Exercise(
    name="cross_entropy", cls="CrossEntropy", page="cross_entropy.md",
    description="mean of -log softmax(logits)[target] over the targets that are not ignored (-100)",
    contract="logits (N, V), targets int (N,) (-100 = ignored) -> loss () , the mean over counted targets",
    saved="ctx.p (N, V) = softmax(logits), ctx.targets (N,), ctx.valid (N,) bool, ctx.count (counted targets)",
    inputs=("logits", "targets"), returns="dlogits, None for targets",
    forward='''    @staticmethod
    def forward(ctx, logits, targets):
        valid = targets != -100
        safe = np.where(valid, targets, 0)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        nll = np.log(e.sum(axis=-1)) - shifted[np.arange(len(targets)), safe]
        ctx.p, ctx.targets, ctx.valid = e / e.sum(axis=-1, keepdims=True), safe, valid
        ctx.count = max(int(valid.sum()), 1)
        return np.asarray((nll * valid).sum() / ctx.count)
''',
    solution='''        dx = ctx.p.copy()
        dx[np.arange(len(dx)), ctx.targets] -= 1          # softmax minus one-hot
        dx *= ctx.valid[:, None] * (dout / ctx.count)     # ignored rows get 0; the mean divides by count
        return dx, None
''',
    hints=[
        "For a counted row, nll_n = log sum_v exp(x_nv) - x_{n,t_n}: d nll_n / d x_nv = p_nv - [v == t_n], "
        "softmax minus the one-hot of the target.",
        "An ignored row has nll 0 whatever its logits: its gradient is 0.",
        "The loss is the SUM of the counted nll divided by count (not by N): every row's gradient is scaled by "
        "dout / count. dout is a 0-d array here (the loss is a scalar).",
        "targets are integers: return None as their gradient.",
    ],
    draw=_cross_entropy_inputs(), reference=lambda logits, targets: F.cross_entropy(logits, targets),
    mistakes={
        "divided by N instead of the number of counted targets": ('''        dx = ctx.p.copy()
        dx[np.arange(len(dx)), ctx.targets] -= 1
        dx *= ctx.valid[:, None] * (dout / len(dx))
        return dx, None
''', "logits"),
        "ignored rows not zeroed": ('''        dx = ctx.p.copy()
        dx[np.arange(len(dx)), ctx.targets] -= 1
        return dx * (dout / ctx.count), None
''', "logits"),
    },
))

_add(Exercise(
    name="scaled_dot_product_attention", cls="Attention", page="scaled_dot_product_attention.md",
    description="causal softmax(q k^T / sqrt(HS)) v: two matmuls around a softmax",
    contract="q, k, v (B, NH, T, HS) -> out (B, NH, T, HS), causal (query i sees keys 0..i)",
    saved="ctx.q, ctx.k, ctx.v, ctx.p (B, NH, T, T) the attention probabilities, ctx.scale = 1/sqrt(HS)",
    inputs=("q", "k", "v"), returns="dq, dk, dv",
    forward='''    @staticmethod
    def forward(ctx, q, k, v):
        T, HS = q.shape[-2], q.shape[-1]
        scale = 1 / np.sqrt(HS)
        s = (q @ k.swapaxes(-1, -2)) * scale
        s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        ctx.q, ctx.k, ctx.v, ctx.p, ctx.scale = q, k, v, p, scale
        return p @ v
''',
    solution='''        q, k, v, p, scale = ctx.q, ctx.k, ctx.v, ctx.p, ctx.scale
        dv = p.swapaxes(-1, -2) @ dout                       # O = P V
        dp = dout @ v.swapaxes(-1, -2)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward, row by row
        dq = (ds @ k) * scale                                # S = scale Q K^T
        dk = (ds.swapaxes(-1, -2) @ q) * scale
        return dq, dk, dv
''',
    hints=[
        "Go through the forward in reverse. O = P V is a matmul: dV = P^T dO and dP = dO V^T.",
        "P = softmax(S) row by row: dS = P * (dP - rowsum(dP * P)) (the softmax exercise). Masked entries have "
        "P = 0, so no gradient reaches them: no special case needed.",
        "S = scale Q K^T: dQ = scale dS K and dK = scale dS^T Q. Do not forget the scale.",
    ],
    draw=_attention_inputs(), reference=lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    mistakes={
        "no 1/sqrt(HS) factor in dq and dk": ('''        q, k, v, p = ctx.q, ctx.k, ctx.v, ctx.p
        dp = dout @ v.swapaxes(-1, -2)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dout
''', "q"),
    },
))

_add(Exercise(
    name="rope", cls="RoPE", page="rope.md",
    description="rotary position embedding: rotate pairs (i, i + HS/2) by position-dependent angles",
    contract="x (B, NH, T, HS) with HS even, pos int (T,) -> out (B, NH, T, HS)",
    saved="ctx.cos and ctx.sin (T, HS/2), the rotation of each (position, pair)",
    inputs=("x", "pos"), returns="dx, None for pos",
    forward='''    @staticmethod
    def forward(ctx, x, pos, theta=10000.0):
        HS = x.shape[-1]
        angle = pos[:, None] / theta ** (np.arange(0, HS, 2) / HS)       # (T, HS/2)
        ctx.cos, ctx.sin = np.cos(angle), np.sin(angle)
        a, b = x[..., : HS // 2], x[..., HS // 2:]
        return np.concatenate([a * ctx.cos - b * ctx.sin, b * ctx.cos + a * ctx.sin], axis=-1)
''',
    solution='''        cos, sin = ctx.cos, ctx.sin
        half = dout.shape[-1] // 2
        da_out, db_out = dout[..., :half], dout[..., half:]
        # the transpose of a rotation is the rotation by -angle
        return np.concatenate([da_out * cos + db_out * sin, db_out * cos - da_out * sin], axis=-1), None
''',
    hints=[
        "Per position and pair the op is linear: (a', b') = R (a, b) with R = [[cos, -sin], [sin, cos]].",
        "The gradient of a linear map is its transpose: (da, db) = R^T (da', db').",
        "R^T is the rotation by -angle: da = da' cos + db' sin, db = db' cos - da' sin. pos gets None.",
    ],
    draw=_rope_inputs(), reference=lambda x, pos: F.rope(x, pos),
    mistakes={
        "rotated forward again instead of back": ('''        cos, sin = ctx.cos, ctx.sin
        half = dout.shape[-1] // 2
        a, b = dout[..., :half], dout[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1), None
''', "x"),
    },
))

_add(Exercise(
    name="swiglu", cls="SwiGLU", page="silu_and_swiglu.md",
    description="silu(gate) * up, the gated unit of Llama's MLP: the product rule in two inputs",
    contract="gate (B, T, H), up (B, T, H) -> out (B, T, H), elementwise",
    saved="ctx.gate, ctx.up and ctx.sig = sigmoid(gate)",
    inputs=("gate", "up"), returns="dgate, dup",
    forward='''    @staticmethod
    def forward(ctx, gate, up):
        ctx.sig = 1 / (1 + np.exp(-gate))
        ctx.gate, ctx.up = gate, up
        return gate * ctx.sig * up
''',
    solution='''        gate, up, sig = ctx.gate, ctx.up, ctx.sig
        dgate = dout * up * sig * (1 + gate * (1 - sig))
        dup = dout * gate * sig
        return dgate, dup
''',
    hints=[
        "out = silu(gate) * up: in up it is linear, dup = dout * silu(gate) = dout * gate * sig.",
        "In gate: dgate = dout * up * silu'(gate).",
        "silu'(g) = sig + g sig (1 - sig) = sig (1 + g (1 - sig)) (the silu exercise).",
    ],
    draw=_swiglu_inputs(), reference=F.swiglu,
    mistakes={
        "silu' taken as sigmoid'": ('''        gate, up, sig = ctx.gate, ctx.up, ctx.sig
        return dout * up * sig * (1 - sig), dout * gate * sig
''', "gate"),
    },
))


def render(exercise, backward_body=None, directory="."):
    """The learner's file: the forward written, the backward `backward_body` (default: a stub to fill)."""
    e = exercise
    stub = f'''        # return {e.returns}
        raise NotImplementedError("write the backward of {e.name}")
'''
    return f'''"""Exercise {e.name}: write the backward pass. {e.description}.

Shape contract: {e.contract}
What forward leaves on ctx: {e.saved}
ctx.needs_input_grad[i] says whether input i wants a gradient (returning all of them is fine).

backward(ctx, dout) gets dout = dL/d(out), of out's shape, and returns one gradient per input of
forward, in order, each of that input's shape: {e.returns}.
Read the derivation in docs/backward/{e.page} of the tinygrad_llm repository, or take it a step at a
time: python -m tinygrad_llm.exercises hint {e.name} 1
Check:      python -m tinygrad_llm.exercises check {e.name} {directory}
Leave forward as it is: the check compares it with the library's op.
"""
import numpy as np

from tinygrad_llm.tensor import Function


class {e.cls}(Function):
{e.forward}
    @staticmethod
    def backward(ctx, dout):
{backward_body if backward_body is not None else stub}'''


def _reindent_check():
    # every source fragment must be indented for its place in the class (a guard for editors of this file)
    for e in EXERCISES.values():
        assert e.forward.startswith("    @staticmethod\n"), e.name
        for body in [e.solution] + [m[0] for m in e.mistakes.values()]:
            assert all(line.startswith("        ") for line in body.splitlines() if line.strip()), e.name


_reindent_check()
