"""python -m tinygrad_llm.exercises: reference solutions pass, classic mistakes fail with a specific message,
and the command line answers a learner's slips with one line and a non-zero exit."""
import os
import subprocess
import sys

import pytest

from tinygrad_llm.exercises import core as X
from tinygrad_llm.exercises.core import EXERCISES, grade, load, render
from tinygrad_llm.exercises.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ["linear", "embedding", "gelu", "layer_norm", "rms_norm", "softmax", "cross_entropy",
            "scaled_dot_product_attention", "rope", "swiglu"]
MISTAKES = [(name, label) for name, e in EXERCISES.items() for label in e.mistakes]


def _write(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(render(EXERCISES[name], body, str(tmp_path)))
    return load(name, tmp_path)


def _solution_lines(e):
    return [line.split("#")[0].strip() for line in e.solution.splitlines() if len(line.split("#")[0].strip()) > 12]


def test_catalogue_covers_the_required_ops_each_with_a_mistake_and_hints():
    assert set(REQUIRED) <= set(EXERCISES)
    for e in EXERCISES.values():
        assert e.mistakes and len(e.hints) >= 2 and os.path.isfile(os.path.join(ROOT, "docs", "backward", e.page))


@pytest.mark.parametrize("name", list(EXERCISES))
def test_reference_solution_passes(tmp_path, name):
    cls, path = _write(tmp_path, name, EXERCISES[name].solution)
    ok, report = grade(name, cls, path, max_examples=12)
    assert ok, report
    assert report.startswith("pass: 12 drawn inputs") and "3 against finite differences" in report


@pytest.mark.parametrize("name,label", MISTAKES)
def test_classic_mistake_fails_naming_the_wrong_gradient(tmp_path, name, label):
    e = EXERCISES[name]
    body, wrong_input = e.mistakes[label]
    cls, path = _write(tmp_path, name, body)
    ok, report = grade(name, cls, path, max_examples=30)
    assert not ok
    first = report.splitlines()[0]
    assert first.startswith(f"the gradient of {wrong_input} ") and ("is wrong" in first or "has shape" in first), report
    assert "on the smallest failing input:" in report
    for line in _solution_lines(e):   # the report never shows the reference backward
        assert line not in report


def test_mistake_messages_are_specific(tmp_path):
    # a wrong-shape mistake names both shapes; a value mistake names the element and both values
    cls, path = _write(tmp_path, "linear", EXERCISES["linear"].mistakes["bias gradient not summed over the rows"][0])
    _, report = grade("linear", cls, path, max_examples=10)
    assert report.startswith("the gradient of b has shape (") and "; b has shape (1,)" in report
    cls, path = _write(tmp_path, "embedding", EXERCISES["embedding"].mistakes["repeated ids overwrite instead of adding"][0])
    _, report = grade("embedding", cls, path, max_examples=30)
    assert report.startswith("the gradient of w is wrong: at w[") and "yours is" in report and "the right value is" in report
    # the smallest input showing an overwritten repeated id holds a repeated id
    idx_line = [line for line in report.splitlines() if line.strip().startswith("idx:")][0]
    ids = [int(t) for t in idx_line.split(":", 2)[2].replace("[", " ").replace("]", " ").replace(",", " ").split()]
    assert len(ids) > len(set(ids)), report


def test_changed_forward_and_wrong_return_count(tmp_path):
    e = EXERCISES["softmax"]
    source = render(e, e.solution).replace("return ctx.p\n", "return ctx.p * 2\n", 1)
    (tmp_path / "softmax.py").write_text(source)
    ok, report = grade("softmax", *load("softmax", tmp_path), max_examples=5)
    assert not ok and report.startswith("your forward's output differs from the library's softmax")
    cls, path = _write(tmp_path, "linear", "        return dout, dout\n")
    ok, report = grade("linear", cls, path, max_examples=5)
    assert not ok and report == ("backward returned 2 gradient(s); forward has 3 inputs (x, w, b): return one per "
                                 "input, None for integer ones")


# ---- the command line -------------------------------------------------------------------------------

def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_start_check_solution_flow(tmp_path, capsys):
    d = str(tmp_path)
    code, out, _ = _cli(capsys, "list")
    assert code == 0 and len(out.splitlines()) == len(EXERCISES)
    assert all(line.split()[0] in EXERCISES and len(line.split()) > 3 for line in out.splitlines())

    code, out, _ = _cli(capsys, "start", "layer_norm", d)
    written = (tmp_path / "layer_norm.py").read_text()
    assert code == 0 and "raise NotImplementedError" in written and "def forward(ctx, x, w, b, eps=1e-5)" in written
    assert "docs/backward/layer_norm.md" in written and "Shape contract: x (B, T, C)" in written and "ctx.rstd" in written
    code, _, err = _cli(capsys, "start", "layer_norm", d)
    assert code == 2 and "exists; pass --force" in err

    code, out, _ = _cli(capsys, "check", "layer_norm", d, "--examples", "5")
    assert code == 1 and out.strip() == "FAIL layer_norm: the backward is not written yet (it raises NotImplementedError)"
    code, _, err = _cli(capsys, "solution", "layer_norm", d)
    assert code == 2 and "no recorded pass of layer_norm" in err

    (tmp_path / "layer_norm.py").write_text(written.replace(
        '''        # return dx, dw, db\n        raise NotImplementedError("write the backward of layer_norm")\n''',
        EXERCISES["layer_norm"].solution))
    code, out, _ = _cli(capsys, "check", "layer_norm", d, "--examples=5")
    assert code == 0 and out.startswith("PASS layer_norm: pass: 5 drawn inputs")
    code, out, _ = _cli(capsys, "solution", "layer_norm", d)
    assert code == 0 and "def backward(ctx, dout):" in out and EXERCISES["layer_norm"].solution in out
    code, out, _ = _cli(capsys, "solution", "softmax", d, "--force")
    assert code == 0 and EXERCISES["softmax"].solution in out

    code, out, _ = _cli(capsys, "hint", "layer_norm", "2")
    assert code == 0 and out.startswith("layer_norm, hint 2 of 5 (docs/backward/layer_norm.md): ")
    code, out, _ = _cli(capsys, "hint", "softmax")
    assert code == 0 and "hint 1 of" in out
    code, _, err = _cli(capsys, "hint", "softmax", "9")
    assert code == 2 and err.strip() == "softmax has hints 1 to 3, not 9"


def test_learner_slips_give_one_line_and_a_nonzero_exit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    e = EXERCISES["gelu"]
    (tmp_path / "gelu.py").write_text(render(e, "        return dout * (1 +\n"))              # syntax error
    (tmp_path / "softmax.py").write_text(render(EXERCISES["softmax"], "        return dout / 0 + {}['key']\n"))
    (tmp_path / "rope.py").write_text("import numpy as np\nraise RuntimeError('boom')\n")
    (tmp_path / "swiglu.py").write_text("x = 1\n")
    cases = {
        ("check", "no_such_op"): "unknown exercise 'no_such_op'; `python -m tinygrad_llm.exercises list` shows them all",
        ("check", "linear"): "no file linear.py: run `python -m tinygrad_llm.exercises start linear .` first",
        ("check", "gelu"): "gelu.py, line 28: syntax error: '(' was never closed",
        ("check", "softmax"): "FAIL softmax: your backward raised KeyError: 'key' (softmax.py, line 28)",
        ("check", "rope"): "rope.py raised RuntimeError: boom when loaded (rope.py, line 2)",
        ("check", "swiglu"): "swiglu.py defines no class SwiGLU with forward and backward",
        ("check", "rope", "--examples", "0"): "--examples must be at least 1, got 0",
        ("hint", "nope"): "unknown exercise 'nope'",
    }
    for argv, start in cases.items():
        code, out, err = _cli(capsys, *argv)
        text = (out + err).strip()
        assert code != 0 and len(text.splitlines()) == 1 and text.startswith(start), (argv, text)
    with pytest.raises(SystemExit) as info:
        main(["check", "--help"])
    assert info.value.code == 0 and "--examples" in capsys.readouterr().out


def test_cli_process_has_no_traceback_for_an_exception_in_learner_code(tmp_path):
    (tmp_path / "softmax.py").write_text(render(EXERCISES["softmax"], "        return dout / 0 + {}['key']\n"))
    r = subprocess.run([sys.executable, "-m", "tinygrad_llm.exercises", "check", "softmax"], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 1 and r.stderr == ""
    assert r.stdout == "FAIL softmax: your backward raised KeyError: 'key' (softmax.py, line 28)\n"


def test_pass_state_is_kept_per_folder(tmp_path):
    assert not X.passed("rope", tmp_path)
    X.record_pass("rope", tmp_path)
    X.record_pass("gelu", tmp_path)
    assert X.passed("rope", tmp_path) and X.passed("gelu", tmp_path) and not X.passed("rope", tmp_path / "other")
