"""gradcheck itself: it passes right gradients, catches a wrong one, refuses float32, and the CLI works."""
import numpy as np
import pytest

from tinygrad_llm import gradcheck as gc
from tinygrad_llm.gradcheck import gradcheck
from tinygrad_llm.tensor import Function


class SquareWithWrongBackward(Function):
    """(N,) -> (N,): x^2, but backward forgets the factor 2."""

    @staticmethod
    def forward(ctx, x):
        ctx.x = x
        return x * x

    @staticmethod
    def backward(ctx, dout):
        return dout * ctx.x  # wrong on purpose: d(x^2) = 2 x dx


class SquareWithRightBackward(SquareWithWrongBackward):
    @staticmethod
    def backward(ctx, dout):
        return 2 * dout * ctx.x


def test_passes_a_right_backward_and_reports_each_input():
    x = np.array([1.0, -2.0, 0.5])
    result = gradcheck(SquareWithRightBackward.apply, [x])
    assert result.passed and bool(result)
    assert len(result.inputs) == 1 and result.inputs[0].shape == (3,) and result.max_abs_err < 1e-8


def test_catches_a_wrong_backward():
    x = np.array([1.0, -2.0, 0.5])
    result = gradcheck(SquareWithWrongBackward.apply, [x])
    assert not result.passed
    assert result.max_rel_err > 0.1
    with pytest.raises(AssertionError, match="gradcheck failed"):
        gradcheck(SquareWithWrongBackward.apply, [x], raise_on_failure=True)


def test_rejects_float32_inputs():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x * x, [np.ones(3, dtype=np.float32)])


def test_integer_inputs_pass_through_unchecked():
    ids = np.array([0, 2, 2])
    result = gradcheck(lambda w, i: w[i], [np.arange(3.0), ids])
    assert result.passed and [r.index for r in result.inputs] == [0]


def test_op_cases_cover_every_public_functional_op():
    import tinygrad_llm.functional as F

    names = " ".join(name for name, _, _ in gc.op_cases())
    for op in ["linear", "embedding", "layer_norm", "rms_norm", "gelu", "silu", "swiglu", "softmax", "log_softmax",
               "cross_entropy", "dropout", "dropout_add", "attention", "rope"]:
        assert op in names, op
    assert all(callable(getattr(F, op)) for op in F.__all__)


def test_cli_checks_every_op_and_exits_zero(capsys):
    assert gc.main([]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines()[1:-1]]
    assert len(rows) == len(gc.op_cases())
    assert all(line.rstrip().endswith("ok") for line in rows)
    assert out.splitlines()[-1] == f"{len(rows)} passed, 0 failed"


def test_cli_op_filter_and_unknown_op(capsys):
    assert gc.main(["--op", "layer_norm"]) == 0
    assert "layer_norm" in capsys.readouterr().out
    assert gc.main(["--op", "no-such-op"]) == 2


def test_cli_exits_one_on_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(gc, "op_cases", lambda: [("broken square", SquareWithWrongBackward.apply, [np.array([1.0, 2.0])])])
    assert gc.main([]) == 1
    assert "FAIL" in capsys.readouterr().out
