"""The demo's toy instructions, solved and verified: nine kinds with one correct answer each (the
demo's world uses four of them: repeat, flip, last, count; earlier worlds and tests use the others).

The verifier reads the instruction with anchored regular expressions that run in linear time
(no nested quantifiers) and recomputes the answer; it never executes anything. Prompts longer
than MAX_PROMPT_CHARS are not toy instructions (this also keeps every number far below Python's
4,300-digit limit on int()).
"""

from __future__ import annotations

import re

MAX_PROMPT_CHARS = 1000

PATTERNS = {
    "repeat": re.compile(r"^Repeat the word ([a-z]+) (\d) times\.$"),
    "upper": re.compile(r"^Write ([a-z]+) in capital letters\.$"),
    "reverse": re.compile(r"^Spell ([a-z]+) backwards\.$"),
    "add": re.compile(r"^What is (\d+) plus (\d+)\?$"),
    "sort": re.compile(r"^Sort these numbers: (\d+(?: \d+)*)$"),
    "flip": re.compile(r"^Reverse the order of: ([a-z]+(?: [a-z]+)*)$"),
    "member": re.compile(r"^Is ([a-z]+) in: ([a-z]+(?: [a-z]+)*)$"),
    "last": re.compile(r"^What is the last word of: ([a-z]+(?: [a-z]+)*)$"),
    "count": re.compile(r"^How many words are in: ([a-z]+(?: [a-z]+)*)$"),
}


def solve(prompt: str) -> str | None:
    """The correct answer to a toy instruction, or None if the prompt is not one."""
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        return None
    for kind, pattern in PATTERNS.items():
        m = pattern.match(prompt)
        if not m:
            continue
        if kind == "repeat":
            return " ".join([m.group(1)] * int(m.group(2)))
        if kind == "upper":
            return m.group(1).upper()
        if kind == "reverse":
            return m.group(1)[::-1]
        if kind == "add":
            return str(int(m.group(1)) + int(m.group(2)))
        if kind == "sort":
            return " ".join(sorted(m.group(1).split(), key=int))
        if kind == "member":
            return "yes" if m.group(1) in m.group(2).split() else "no"
        words = m.group(1).split()
        if kind == "flip":
            return " ".join(reversed(words))
        if kind == "last":
            return words[-1]
        return str(len(words))
    return None


def toy_reward(prompt: str, response: str) -> float:
    """1.0 for the exact answer (surrounding whitespace ignored), else 0.0."""
    answer = solve(prompt)
    return float(answer is not None and len(response) <= 2 * MAX_PROMPT_CHARS and response.strip() == answer)
