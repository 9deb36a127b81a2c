"""Rendering: the only package that imports rich (terminal tables) or matplotlib (plots).
Measurement code returns plain records; these modules turn them into text and pictures."""

from __future__ import annotations

import json
import os

from rich.console import Console

from ..io.atomic import write_atomic

__all__ = ["console", "fmt_int", "fmt_mib", "make_console", "write_json", "write_text_atomic"]

_CONSOLE: Console | None = None
# Piped or redirected output has no terminal width to fit: rich would assume 80 columns and
# cut numbers short ("46,7…"); a wide page keeps every figure whole.
NON_TERMINAL_WIDTH = 240


def make_console(file=None) -> Console:
    """A console on ``file`` (default stdout): a terminal's own width, else
    ``NON_TERMINAL_WIDTH`` columns."""
    made = Console(file=file, highlight=False)
    if not made.is_terminal:
        made = Console(file=file, highlight=False, width=NON_TERMINAL_WIDTH)
    return made


def console() -> Console:
    """The one console everything prints through (stdout)."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = make_console()
    return _CONSOLE


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_mib(n: int | None) -> str:
    """Bytes as MiB with one decimal; empty for None."""
    return "" if n is None else f"{n / 2**20:,.1f}"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: an interrupted write leaves the previous file."""
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, data: dict) -> None:
    """JSON to a file (atomically), or to stdout when ``path`` is ``-``."""
    text = json.dumps(data, indent=2) + "\n"
    if str(path) == "-":
        print(text, end="")
    else:
        write_text_atomic(path, text)
