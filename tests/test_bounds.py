"""No entry point reads or writes out of bounds: Function.apply checks index and shape arguments
(Function.check_inputs) on the NumPy reference path and on the kernel path alike."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinygrad_llm import functional as F
from tinygrad_llm.tensor import Tensor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["kernels", "numpy"])
def path(request, monkeypatch):
    """Both implementations: the registered kernels (default) and the NumPy reference."""
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS", "1" if request.param == "kernels" else "0")
    return request.param


def _logits(N=4, V=5):
    return Tensor(np.random.default_rng(0).standard_normal((N, V)).astype(np.float32), requires_grad=True)


@pytest.mark.parametrize("bad", [5, 10**6, -1, -(10**6)])
def test_cross_entropy_apply_rejects_targets_outside_the_vocabulary(path, bad):
    targets = np.array([0, 1, bad, 2])
    with pytest.raises(IndexError, match=rf"cross_entropy: target {bad} is outside \[0, 5\)"):
        F.CrossEntropy.apply(_logits(), targets)
    with pytest.raises(IndexError, match=rf"target {bad} is outside"):
        F.cross_entropy(_logits(), targets)


def test_cross_entropy_apply_accepts_ignore_index_and_checks_shape_and_dtype(path):
    loss = F.CrossEntropy.apply(_logits(), np.array([0, -100, 4, 2]))
    assert np.isfinite(loss.item())
    loss = F.CrossEntropy.apply(_logits(), np.array([0, 7, 4, 2]), ignore_index=7)   # ignore_index may be anything
    assert np.isfinite(loss.item())
    with pytest.raises(ValueError, match=r"targets have shape \(3,\); expected targets of shape \(4,\)"):
        F.CrossEntropy.apply(_logits(), np.array([0, 1, 2]))       # a short targets array: reads past its end
    with pytest.raises(TypeError, match="targets must hold integers"):
        F.CrossEntropy.apply(_logits(), np.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="targets must be an integer array, got list"):
        F.CrossEntropy.apply(_logits(), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="no classes"):
        F.CrossEntropy.apply(Tensor(np.zeros((2, 0), np.float32)), np.array([-100, -100]))
    with pytest.raises(ValueError, match="reduction must be"):
        F.CrossEntropy.apply(_logits(), np.array([0, 1, 2, 3]), reduction="avg")


@pytest.mark.parametrize("bad", [7, 10**6, -1])
def test_embedding_apply_rejects_ids_outside_the_table(path, bad):
    w = Tensor(np.ones((7, 3), np.float32), requires_grad=True)
    with pytest.raises(IndexError, match=rf"embedding: token id {bad} is outside the vocabulary \[0, 7\)"):
        F.Embedding.apply(np.array([[0, bad]]), w)
    with pytest.raises(TypeError, match="idx must hold integers"):
        F.Embedding.apply(np.array([0.0, 1.0]), w)
    with pytest.raises(ValueError, match=r"w must be a \(V, C\) table"):
        F.Embedding.apply(np.array([0]), Tensor(np.ones(7, np.float32)))


def test_norm_apply_checks_parameter_shapes(path):
    x = Tensor(np.ones((2, 8), np.float32))
    short = Tensor(np.ones(7, np.float32))
    with pytest.raises(ValueError, match=r"layer_norm: x has last axis 8 but w has shape \(7,\)"):
        F.LayerNorm.apply(x, short, None)
    with pytest.raises(ValueError, match=r"layer_norm: x has last axis 8 but b has shape \(7,\)"):
        F.LayerNorm.apply(x, None, short)
    with pytest.raises(ValueError, match=r"rms_norm: x has last axis 8 but w has shape \(7,\)"):
        F.RMSNorm.apply(x, short, eps=1e-6)


def test_cross_entropy_target_far_outside_does_not_crash_the_process():
    """The Numba kernel once read logits[row, 10**6] and died with SIGSEGV; in a child process, so that
    a regression fails this test instead of killing the test run."""
    code = ("import numpy as np\nfrom tinygrad_llm import functional as F\nfrom tinygrad_llm.tensor import Tensor\n"
            "x = Tensor(np.zeros((3, 65), np.float32), requires_grad=True)\n"
            "try:\n    F.CrossEntropy.apply(x, np.array([1, 10**6, 2]))\n"
            "except IndexError as e:\n    print('refused:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: cross_entropy: target 1000000 is outside [0, 65)" in result.stdout


def test_attention_apply_checks_shapes(path):
    """The Numba attention kernel reads v for every key of k: a v with fewer positions was read past its end."""
    f = lambda *shape: Tensor(np.ones(shape, np.float32), requires_grad=True)  # noqa: E731
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 16, 8\), v has shape \(1, 2, 4, 8\)"):
        F.ScaledDotProductAttention.apply(f(1, 2, 16, 8), f(1, 2, 16, 8), f(1, 2, 4, 8), None, causal=True, scale=0.3)
    with pytest.raises(ValueError, match=r"q has shape \(1, 2, 16, 8\), k has shape \(1, 2, 16, 4\)"):
        F.ScaledDotProductAttention.apply(f(1, 2, 16, 8), f(1, 2, 16, 4), f(1, 2, 16, 4), None, causal=True, scale=0.3)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3\) does not broadcast"):
        F.ScaledDotProductAttention.apply(f(1, 2, 16, 8), f(1, 2, 16, 8), f(1, 2, 16, 8), np.ones((3, 3), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        F.ScaledDotProductAttention.apply(f(1, 2, 16, 8), f(1, 2, 16, 8), f(1, 2, 16, 8), np.ones((16, 16)))
    with pytest.raises(ValueError, match=r"qkv has shape \(2, 16, 40\); expected \(B, T, 3C\) with C divisible by n_head=3"):
        F.SelfAttention.apply(f(2, 16, 40), n_head=3, causal=True, scale=0.3)
    with pytest.raises(ValueError, match="n_head must be a positive integer"):
        F.SelfAttention.apply(f(2, 16, 48), n_head=0)
