"""What the benchmark scripts share on their command line: a parser whose errors are one line, argument
types that refuse zero and negative counts, and the default text (the tiny Shakespeare shipped with the
repository, so a fresh clone runs every benchmark without a download)."""
import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / "examples" / "data" / "tinyshakespeare.txt"


class Parser(argparse.ArgumentParser):
    """argparse, with a user's mistake reported as one line on stderr (exit status 2), no usage block."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text):
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def _int_at_least(text, low, what):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def require_file(parser, option, path):
    """parser.error (one line, exit 2) unless `path` is a readable file."""
    if not Path(path).is_file():
        parser.error(f"{option} {path}: no such file")
