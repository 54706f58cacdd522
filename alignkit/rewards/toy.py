"""The demo's toy instructions, solved and verified: five kinds with one correct answer each.

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
        return " ".join(sorted(m.group(1).split(), key=int))
    return None


def toy_reward(prompt: str, response: str) -> float:
    """1.0 for the exact answer (surrounding whitespace ignored), else 0.0."""
    answer = solve(prompt)
    return float(answer is not None and len(response) <= 2 * MAX_PROMPT_CHARS and response.strip() == answer)
