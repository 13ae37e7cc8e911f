"""Command-line conventions every CLI of the project shares (standard library only).

* **One list syntax.** A list option takes items separated by commas and/or
  spaces: ``--budgets 256,512``, ``--budgets "256 512"`` and ``--budgets 256 512``
  are the same list (:func:`add_list_argument`).
* **Help shows the defaults** (:class:`HelpFormatter`), lists as they are typed.
* **One-line errors.** A bad value is ``prog: error: message`` on stderr and exit
  status 2, never a traceback: argparse's own errors for what the parser can check,
  :func:`run_command` for what only running the command finds (a missing file, an
  unwritable folder, a server that does not answer). Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from clear_core.errors import ClearError

#: What every list option's help says about its syntax.
LIST_SYNTAX = "comma- or space-separated"
#: Exit status of a usage error (argparse's), and of an interrupted command (the shell's 128 + SIGINT).
USAGE_ERROR = 2
INTERRUPTED = 130

_SEPARATORS = re.compile(r"[,\s]+")


class UsageError(Exception):
    """A command-line value that turned out wrong only when the command ran (printed as ``prog: error: ...``)."""


def split_items(text: str) -> list[str]:
    """``"a,b c"`` -> ``["a", "b", "c"]``."""
    return [item for item in _SEPARATORS.split(text.strip()) if item]


def list_of(kind: Callable = str, what: str = "values") -> Callable[[str], list]:
    """An argparse ``type``: one argument -> the list of its items, each converted by ``kind``."""

    def parse(text: str) -> list:
        items = split_items(text)
        if not items:
            raise argparse.ArgumentTypeError(f"expected {what}, {LIST_SYNTAX}; got {text!r}")
        out = []
        for item in items:
            try:
                out.append(kind(item))
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise argparse.ArgumentTypeError(f"expected {what}, {LIST_SYNTAX}; got {item!r}") from None
        return out

    return parse


def parses_a_list(fn: Callable[[str], list]) -> Callable[[str], list]:
    """Mark an argparse ``type`` that turns one whole argument into a list (see :func:`add_list_argument`)."""
    fn.parses_a_list = True  # type: ignore[attr-defined]
    return fn


@parses_a_list
def path_list(text: str) -> list[str]:
    """``list_of(str)`` for file names, except that a name of an existing file is never split
    (a path may contain a space or a comma)."""
    return [text] if os.path.exists(text) else list_of(str, "paths")(text)


class _Flatten(argparse.Action):
    """``nargs="+"`` of list-typed values (one list per argument) -> one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for value in values for item in value])


class _FlattenRepeated(_Flatten):
    """:class:`_Flatten` for an option that may be given several times: the lists add up."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        before = [] if before is None or before is self.default else before
        setattr(namespace, self.dest, before + [item for value in values for item in value])


def add_list_argument(parser: argparse.ArgumentParser, *flags: str, kind: Callable = str, what: str = "values",
                      default=None, help: str = "", repeatable: bool = False, **kwargs) -> argparse.Action:
    """A list option in the one list syntax (module docstring); ``repeatable``: given twice, the lists add up.

    ``kind`` converts one item; a ``kind`` marked with :func:`parses_a_list` takes a
    whole argument and returns its list (:func:`path_list`, a policy-list parser). ``default`` may be
    the list or its text (``"256,512"``).
    """
    convert = kind if getattr(kind, "parses_a_list", False) else list_of(kind, what)
    if isinstance(default, str):
        default = convert(default)
    return parser.add_argument(*flags, nargs="+", type=convert, action=_FlattenRepeated if repeatable else _Flatten,
                               default=default,
                               help=f"{help} ({LIST_SYNTAX})" if help else LIST_SYNTAX, **kwargs)


def one_of(choices) -> Callable[[str], str]:
    """A list item that must be one of ``choices`` (give ``add_list_argument`` ``what=`` naming them)."""
    allowed = tuple(choices)

    def convert(text: str) -> str:
        if text not in allowed:
            raise ValueError(text)
        return text

    return convert


def _number(text: str, kind: Callable, ok: Callable[[float], bool], expected: str):
    """``kind(text)`` if ``ok`` of it, else argparse's one-line error naming what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def _shown(default) -> str:
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return str(default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (usage examples) and appends ``(default: X)`` to every
    option that has a default worth showing and does not mention it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not nothing and "default" not in text:
            text += " (default: " + _shown(action.default).replace("%", "%%") + ")"
        return text


def one_line(exc: BaseException) -> str:
    """A one-line message for an error a user can fix (no traceback, no repr)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def make_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder ``path`` now, so an unwritable one fails before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".clear-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"argument {option}: cannot write to {path}: {exc.strerror or exc}") from None
    return path


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run ``command`` and turn the errors a user can fix into ``prog: error: ...`` and exit 2.

    Those are :class:`UsageError`, the project's own :class:`ClearError` (they name the
    bad value) and :class:`OSError` (a missing or unreadable file, a folder that cannot
    be written). Anything else is a bug and keeps its traceback.
    """
    try:
        return int(command() or 0)
    except (UsageError, ClearError, OSError) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
