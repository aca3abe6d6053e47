"""python -m tinygrad_llm.exercises {list, start, check, hint, solution}: practise writing backward passes."""
import argparse
import os
import sys

from ..fileio import atomic_write


def _parser():
    parser = argparse.ArgumentParser(prog="python -m tinygrad_llm.exercises",
                                     description="Backward-pass exercises: write an op's backward, check it against "
                                                 "the library's op and finite differences.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,start,check,hint,solution}")
    sub.add_parser("list", help="the exercises, one line each")
    start = sub.add_parser("start", help="write NAME.py into DIR: the forward written, the backward to fill")
    start.add_argument("name")
    start.add_argument("dir", nargs="?", default=".", help="folder for NAME.py (default: %(default)s)")
    start.add_argument("--force", action="store_true", help="overwrite an existing NAME.py (default: refuse)")
    check = sub.add_parser("check", help="grade DIR/NAME.py; exit status 0 only on a pass")
    check.add_argument("name")
    check.add_argument("dir", nargs="?", default=".", help="folder holding NAME.py (default: %(default)s)")
    check.add_argument("--examples", type=int, default=30, help="drawn inputs to grade on (default: %(default)s)")
    check.add_argument("--seed", type=int, default=0, help="seed of the drawn inputs (default: %(default)s)")
    hint = sub.add_parser("hint", help="step N of the derivation")
    hint.add_argument("name")
    hint.add_argument("n", nargs="?", type=int, default=1, help="which step (default: %(default)s)")
    solution = sub.add_parser("solution", help="the reference backward, once DIR/NAME.py has passed `check`")
    solution.add_argument("name")
    solution.add_argument("dir", nargs="?", default=".", help="folder of the exercise (default: %(default)s)")
    solution.add_argument("--force", action="store_true", help="show it without a recorded pass (default: no)")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        from .core import EXERCISES, ExerciseError, exercise, exercise_path, grade, load, passed, record_pass, render
    except ImportError as e:  # hypothesis missing
        print(e, file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            width = max(map(len, EXERCISES))
            for name, e in EXERCISES.items():
                print(f"{name:{width}s}  {e.description}")
            return 0
        e = exercise(args.name)
        if args.command == "hint":
            if not 1 <= args.n <= len(e.hints):
                raise ExerciseError(f"{e.name} has hints 1 to {len(e.hints)}, not {args.n}")
            print(f"{e.name}, hint {args.n} of {len(e.hints)} (docs/backward/{e.page}): {e.hints[args.n - 1]}")
            return 0
        if args.command == "start":
            path = exercise_path(e.name, args.dir)
            if path.exists() and not args.force:
                raise ExerciseError(f"{path} exists; pass --force to overwrite it")
            try:
                atomic_write(path, render(e, directory=args.dir))
                os.chmod(path, 0o644)  # atomic_write's temporary file is private; this one is the learner's
            except OSError as err:
                raise ExerciseError(f"cannot write {path}: {err.strerror or err}") from None
            print(f"wrote {path}: fill in {e.cls}.backward, then run "
                  f"`python -m tinygrad_llm.exercises check {e.name} {args.dir}`")
            return 0
        if args.command == "check":
            if args.examples < 1:
                raise ExerciseError(f"--examples must be at least 1, got {args.examples}")
            cls, path = load(e.name, args.dir)
            ok, report = grade(e.name, cls, path, max_examples=args.examples, seed=args.seed)
            if not ok:
                print(f"FAIL {e.name}: {report}")
                return 1
            print(f"PASS {e.name}: {report}")
            try:
                record_pass(e.name, args.dir)
            except OSError as err:
                print(f"(could not record the pass in {args.dir}: {err.strerror or err})", file=sys.stderr)
            else:
                print(f"`python -m tinygrad_llm.exercises solution {e.name} {args.dir}` now shows the reference backward")
            return 0
        if args.command == "solution":
            if not (args.force or passed(e.name, args.dir)):
                raise ExerciseError(f"no recorded pass of {e.name} in {args.dir}: pass `check {e.name} {args.dir}` "
                                    "first, or use --force")
            print(f"# the reference backward of {e.name} (derivation: docs/backward/{e.page})")
            print("    @staticmethod\n    def backward(ctx, dout):\n" + e.solution, end="")
            return 0
    except ExerciseError as err:
        print(err, file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse allows only the commands above


if __name__ == "__main__":
    sys.exit(main())
