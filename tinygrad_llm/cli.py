"""Command-line plumbing shared by `python -m tinygrad_llm.train`, `python -m tinygrad_llm.sample` and examples/.

    parser = config_parser(TrainConfig, description="Train a GPT")   # one --key per dataclass field
    given = parse_config_args(parser, ["--max_iters", "500", "--lr=3e-4"])   # -> {"max_iters": 500, "lr": 0.0003}
    run_cli(main, argv)        # main(argv); a user's mistake -> one line on stderr and a non-zero exit

Each field's --help line is its `option(default, help)` description and default. Only the keys given on the
command line come back from parse_config_args, so a caller can tell "left at its default" from "asked for".
"""
import argparse
import difflib
import sys
from dataclasses import MISSING, field, fields


class UsageError(ValueError):
    """A command line the parser refused (unknown option, malformed value); a CLI exits 2 on it."""


def option(default, help):
    """A dataclass field with a one-line description for --help."""
    return field(default=default, metadata={"help": help})


class _Parser(argparse.ArgumentParser):
    """argparse, raising UsageError instead of printing usage and exiting, so that the caller decides."""

    def error(self, message):
        raise UsageError(message)


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expects true or false, got {text!r}")


def parse_int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None


def parse_float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None


def bounded(parse, check, what):
    """A parser that also checks the value: bounded(parse_float, lambda v: v >= 0, "a number >= 0")."""
    def parse_checked(text):
        value = parse(text)
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse_checked


_PARSERS = {bool: parse_bool, int: parse_int, float: parse_float, str: str}
_TYPE_NAMES = {"bool": bool, "int": int, "float": float, "str": str}
_METAVARS = {bool: "{true,false}", int: "N", float: "X", str: "TEXT"}


def config_parser(config_cls, description=None, defaults=None, choices=None, epilog=None, prog=None):
    """An argparse parser with `--name` for every field of the dataclass config_cls.

    defaults: {name: text} to show in --help instead of the field's default (e.g. one that another
    option decides). choices: {name: allowed values}. The parsed namespace holds only the options given.
    """
    parser = new_parser(description, epilog, prog)
    defaults, choices = defaults or {}, choices or {}
    for f in fields(config_cls):
        kind = _TYPE_NAMES.get(f.type, f.type)  # annotations may be strings
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        metavar = None if f.name in choices else _METAVARS.get(kind, "VALUE")
        parser.add_argument(f"--{f.name}", type=_PARSERS.get(kind, str), choices=choices.get(f.name),
                            default=argparse.SUPPRESS, metavar=metavar,
                            help=f"{f.metadata.get('help', '')} (default: {default})")
    return parser


def new_parser(description=None, epilog=None, prog=None):
    return _Parser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_config_args(parser, argv):
    """{name: value} of the options given in argv (both --key value and --key=value); UsageError otherwise."""
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [a for action in parser._actions for a in action.option_strings]
        name = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        what = "unknown option" if name.startswith("-") else "unexpected argument"
        raise UsageError(f"{what} {unknown[0]!r}{hint} (--help lists every option)")
    return vars(namespace)


def one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def run_cli(main, argv=None):
    """Run main(argv) as a command: a user's mistake is one line on stderr and a non-zero exit, not a traceback.

    UsageError exits 2; an interruption (Ctrl-C, SIGTERM) 130 with its message; ValueError, OSError,
    FloatingPointError (training diverged) and MemoryError exit 1. Other exceptions are bugs and keep
    their traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UsageError as e:
        _fail(f"error: {one_line(e)}", 2)
    except KeyboardInterrupt as e:
        _fail(one_line(e) if str(e) else "interrupted", 130)
    except MemoryError as e:
        _fail(f"error: out of memory ({one_line(e) if str(e) else 'an allocation failed'})", 1)
    except (ValueError, OSError, FloatingPointError) as e:
        _fail(f"error: {one_line(e)}", 1)


def _fail(line, code):
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
