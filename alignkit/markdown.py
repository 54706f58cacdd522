"""Markdown and terminal output of untrusted text (model replies, dataset categories, file names).

One place for the escaping that every report uses: `md_cell` makes text inert in a table cell or
a paragraph, `fenced` wraps lines in a code block that no line inside can close, `terminal_safe`
strips what could drive a terminal. Simplification: inline Markdown is escaped, not rendered.
"""

from __future__ import annotations

import re
import unicodedata

MD_ESCAPES = {"\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]", "<": "&lt;", ">": "&gt;", "&": "&amp;"}


def terminal_safe(text: str) -> str:
    """Text without control characters (escape sequences included), bidi overrides or other format
    characters, except newlines and tabs, so untrusted text cannot drive the terminal."""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf"))


def md_cell(value) -> str:
    """Text made inert in a Markdown table cell: one line, no table breaks, no HTML, no code spans."""
    text = " ".join(terminal_safe(str(value)).split())
    return "".join(MD_ESCAPES.get(ch, ch) for ch in text)


def fenced(lines: list[str], info: str = "text") -> list[str]:
    """A fenced code block that no line inside can close: its fence is longer than any backtick run.
    Control characters are stripped (newlines inside a line split it into more lines)."""
    lines = [part for line in lines for part in terminal_safe(line).split("\n")]
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, *lines, fence]
