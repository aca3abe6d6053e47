"""Grading of the backward-pass exercises (`python -m tinygrad_llm.exercises`).

Each exercise (catalog.py) is an op of the GPT with its forward written and its backward left to the
learner. `check` grades the learner's backward on hypothesis-drawn inputs against the library's own op
(forward output, then every gradient), shrinks a failure to the smallest input that still shows it, and
confirms with central finite differences. It never shows the solution; `solution` does, after a pass
(recorded in a small state file in the exercise folder) or with --force.
"""
import importlib.util
import json
import traceback
import warnings
from pathlib import Path

import numpy as np

from ..fileio import atomic_write
from ..tensor import Context, Tensor
from .. import testing
from .catalog import EXERCISES, Exercise, render

STATE_FILE = ".tinygrad_llm_exercises.json"

__all__ = ["EXERCISES", "Exercise", "ExerciseError", "render", "exercise", "exercise_path", "load", "grade",
           "passed", "record_pass"]


class ExerciseError(Exception):
    """A learner-facing problem (unknown name, missing file, syntax error, ...): one line, no traceback."""


def exercise(name):
    if name not in EXERCISES:
        raise ExerciseError(f"unknown exercise {name!r}; `python -m tinygrad_llm.exercises list` shows them all")
    return EXERCISES[name]


def exercise_path(name, directory="."):
    return Path(directory) / f"{name}.py"


def _learner_line(error, path):
    """' (file.py, line N)' for the deepest frame of the learner's file in error's traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]
    return f" ({Path(path).name}, line {frames[-1].lineno})" if frames else ""


def _one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load(name, directory="."):
    """The learner's Function subclass from DIR/NAME.py; ExerciseError (one line) on any problem."""
    e = exercise(name)
    path = exercise_path(name, directory)
    if not path.is_file():
        raise ExerciseError(f"no file {path}: run `python -m tinygrad_llm.exercises start {name} {directory}` first")
    try:
        source = path.read_text(encoding="utf-8")
        code = compile(source, str(path), "exec")
    except SyntaxError as err:
        raise ExerciseError(f"{path.name}, line {err.lineno}: syntax error: {err.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ExerciseError(f"cannot read {path}: {_one_line(err)}") from None
    module_name = f"_tinygrad_llm_exercise_{name}"
    spec = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    try:
        exec(code, module.__dict__)
    except Exception as err:
        raise ExerciseError(f"{path.name} raised {_one_line(err)} when loaded{_learner_line(err, path)}") from None
    cls = getattr(module, e.cls, None)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("forward", "backward")):
        raise ExerciseError(f"{path.name} defines no class {e.cls} with forward and backward")
    return cls, path


class _Outcome(Exception):
    """A failing example inside the property run: one-line message, kind key, whether to show inputs."""

    def __init__(self, message, key, show_inputs=True):
        super().__init__(message)
        self.key, self.show_inputs, self.drawn = key, show_inputs, None


def _fmt(index):
    return "[" + ", ".join(map(str, index)) + "]"


def _check_example(e, cls, path, arrays):
    """Grade one input tuple; raises _Outcome on the first problem."""
    arrays = [np.asarray(a) for a in arrays]
    floats = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    tensors = [Tensor(a.copy(), requires_grad=i in floats) for i, a in enumerate(arrays)]
    ref_out = e.reference(*tensors)
    dout = np.random.default_rng(0).standard_normal(ref_out.shape)
    ref_out.backward(np.asarray(dout))
    ref_grads = {i: (tensors[i].grad if tensors[i].grad is not None else np.zeros_like(arrays[i])) for i in floats}

    ctx = Context(tuple(i in floats for i in range(len(arrays))))
    try:
        out = cls.forward(ctx, *[a.copy() for a in arrays])
    except Exception as err:
        raise _Outcome(f"your forward raised {_one_line(err)}{_learner_line(err, path)}", ("raised", "forward"),
                       False) from None
    out = np.asarray(out)
    if out.shape != ref_out.shape or not np.allclose(out, ref_out.numpy(), rtol=1e-9, atol=1e-9):
        raise _Outcome(f"your forward's output differs from the library's {e.name} (shape {out.shape}, expected "
                       f"{ref_out.shape}): the exercise is the backward; restore the forward "
                       f"(`start {e.name} DIR --force` writes a fresh file)", ("forward",), False)
    try:
        grads = cls.backward(ctx, dout.copy())
    except NotImplementedError:
        raise _Outcome("the backward is not written yet (it raises NotImplementedError)", ("todo",), False) from None
    except Exception as err:
        raise _Outcome(f"your backward raised {_one_line(err)}{_learner_line(err, path)}", ("raised", "backward"),
                       False) from None
    grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
    if len(grads) != len(arrays):
        raise _Outcome(f"backward returned {len(grads)} gradient(s); forward has {len(arrays)} inputs "
                       f"({', '.join(e.inputs)}): return one per input, None for integer ones", ("count",), False)
    worst = 0.0
    for i in floats:
        name, g = e.inputs[i], grads[i]
        if g is None:
            raise _Outcome(f"backward returned None as the gradient of {name}", ("none", i), False)
        try:
            g = np.asarray(g, dtype=np.float64)
        except (TypeError, ValueError):
            raise _Outcome(f"backward returned a {type(g).__name__} as the gradient of {name}; return an array of "
                           f"{name}'s shape", ("type", i), False) from None
        if g.shape != arrays[i].shape:
            raise _Outcome(f"the gradient of {name} has shape {g.shape}; {name} has shape {arrays[i].shape}",
                           ("shape", i))
        ok, where, _, rel = testing._worst(g, ref_grads[i], 1e-6, 1e-5)
        worst = max(worst, rel)
        if not ok:
            raise _Outcome(f"the gradient of {name} is wrong: at {name}{_fmt(where)} yours is {float(g[where])!r}, "
                           f"the right value is {float(ref_grads[i][where])!r}", ("value", i))
    return worst


def grade(name, cls, path, max_examples=30, seed=0, gradcheck_examples=3):
    """(passed, report): the learner's class on drawn inputs, shrunk on failure; never the solution."""
    # NumPy's warnings from the learner's arithmetic (0/0 on a drawn input...) would bury the one-line report
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return _grade(exercise(name), cls, path, max_examples, seed, gradcheck_examples)


def _grade(e, cls, path, max_examples, seed, gradcheck_examples):
    name = e.name
    seen = []

    def test(drawn):  # one strategy, drawing the whole input tuple
        try:
            _check_example(e, cls, path, drawn)
        except _Outcome as outcome:
            outcome.drawn = drawn
            raise
        if len(seen) < gradcheck_examples:  # finite differences through the learner's own Function.apply
            seen.append(drawn)

    try:
        # hypothesis' own shrinking redraws the arrays hundreds of times (seconds); cutting the failing
        # input's axes and simplifying its values directly (testing._shrink_further) takes milliseconds
        testing._run(test, [e.draw], max_examples, seed, shrink=False)
    except _Outcome as outcome:
        if not outcome.show_inputs:
            return False, str(outcome)
        return False, _report(e, cls, path, _smallest(e, cls, path, outcome))
    for drawn in seen:
        _, failure, _ = testing._gradient_errors(cls, list(drawn), 1e-6, 1e-5, 1e-4, names=e.inputs)
        if failure:
            return False, f"finite differences disagree with your backward: {failure}"
    return True, (f"pass: {max_examples} drawn inputs against the library's {name}, "
                  f"{len(seen)} against finite differences")


def _smallest(e, cls, path, outcome):
    """The smallest input showing the same failure: hypothesis' shrink, then testing's further cut."""
    def same(arrays):
        try:
            _check_example(e, cls, path, arrays)
        except _Outcome as again:
            return again.key == outcome.key
        return False
    smaller = testing._shrink_further([np.asarray(a) for a in outcome.drawn], same, drop_axes=False)
    return testing._simpler_values(smaller, same)


def _report(e, cls, path, drawn):
    try:
        _check_example(e, cls, path, drawn)
        message = "failed"  # not reached: the shrunk input fails by construction
    except _Outcome as outcome:
        message = str(outcome)
    lines = [message, "  on the smallest failing input:"]
    lines += [f"    {name}: {testing._show(a)}" for name, a in zip(e.inputs, drawn)]
    return "\n".join(lines)


def passed(name, directory="."):
    state = Path(directory) / STATE_FILE
    try:
        return name in json.loads(state.read_text(encoding="utf-8")).get("passed", [])
    except (OSError, ValueError, AttributeError):
        return False


def record_pass(name, directory="."):
    state = Path(directory) / STATE_FILE
    try:
        names = set(json.loads(state.read_text(encoding="utf-8")).get("passed", []))
    except (OSError, ValueError, AttributeError):
        names = set()
    names.add(name)
    atomic_write(state, json.dumps({"passed": sorted(names)}, indent=1) + "\n")

