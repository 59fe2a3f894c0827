"""File names are data: shown safely on a terminal, in a spreadsheet and on a web page, stored losslessly.

A path on Linux is any bytes but "/" and NUL: not necessarily UTF-8, possibly holding CR, LF, tabs
or terminal escape sequences. Python holds undecodable bytes as lone surrogates (`os.fsdecode`),
which is lossless (`os.fsencode` gives the bytes back) and is what scores.jsonl stores. Everything
a person reads goes through one of the three helpers here.
"""
from __future__ import annotations

import os
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def readable(text: str | os.PathLike) -> str:
    """Valid Unicode for a file or a page: undecodable bytes of a name become `\\xff` escapes."""
    value = os.fspath(text)
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def for_terminal(text: str | os.PathLike) -> str:
    """Safe to print: `readable`, with control characters (ESC, BEL, CR, LF, C1 ...) escaped as `\\x1b`."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", readable(text))


def one_line(text: str) -> str:
    """The text with every run of whitespace (newlines included) made one space: a message is one line."""
    return " ".join(str(text).split())


def spreadsheet_cell(text: str) -> str:
    """A CSV cell no spreadsheet evaluates (OWASP CSV injection): a leading = + - @ tab or CR gets a "'"."""
    text = readable(text)
    return "'" + text if text.startswith(_FORMULA_START) else text



def safe_name(text: str) -> str:
    """A file-name stem made of [A-Za-z0-9._-] only (at most 80 characters), for files named after inputs."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "image"
