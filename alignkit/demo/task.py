"""The demo's toy instruction-following task, and its verifier.

Five kinds of short instructions with one correct answer each. The verifier reads the
instruction with regular expressions and recomputes the answer; it never executes anything.
"""

from __future__ import annotations

import random
import re

WORDS = (
    "cat dog sun tree book fish bird moon star rain lamp door cake milk ship road "
    "leaf frog king ring wolf bell coin rose snow wind fire lake hill gold"
).split()

KINDS = ("repeat", "upper", "reverse", "add", "sort")


def make_example(rng: random.Random, kind: str | None = None) -> dict:
    kind = kind or rng.choice(KINDS)
    if kind == "repeat":
        w, n = rng.choice(WORDS), rng.randint(2, 4)
        prompt = f"Repeat the word {w} {n} times."
    elif kind == "upper":
        prompt = f"Write {rng.choice(WORDS)} in capital letters."
    elif kind == "reverse":
        prompt = f"Spell {rng.choice(WORDS)} backwards."
    elif kind == "add":
        prompt = f"What is {rng.randint(0, 9)} plus {rng.randint(0, 9)}?"
    else:
        prompt = "Sort these numbers: " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
    return {"prompt": prompt, "completion": solve(prompt), "category": kind}


PATTERNS = {
    "repeat": re.compile(r"^Repeat the word ([a-z]+) (\d) times\.$"),
    "upper": re.compile(r"^Write ([a-z]+) in capital letters\.$"),
    "reverse": re.compile(r"^Spell ([a-z]+) backwards\.$"),
    "add": re.compile(r"^What is (\d+) plus (\d+)\?$"),
    "sort": re.compile(r"^Sort these numbers: ((?:\d+ ?)+)$"),
}


def solve(prompt: str) -> str | None:
    """The correct answer to a toy instruction, or None if the prompt is not one."""
    for kind, pattern in PATTERNS.items():
        m = pattern.match(prompt.strip())
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
    return float(answer is not None and response.strip() == answer)


def make_dataset(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, KINDS[i % len(KINDS)]) for i in range(n)]


def near_miss(prompt: str, rng: random.Random) -> str:
    """A plausible wrong answer (the kind a half-trained model gives), for preference pairs."""
    answer = solve(prompt)
    words = answer.split()
    kind = next(k for k, p in PATTERNS.items() if p.match(prompt))
    if kind == "add":
        wrong = str(int(answer) + rng.choice([-2, -1, 1, 2]))
        return wrong if wrong != answer and not wrong.startswith("-") else str(int(answer) + 1)
    if kind == "repeat":
        return " ".join(words + [words[0]] if rng.random() < 0.5 or len(words) < 3 else words[:-1])
    if kind == "upper":
        i = rng.randrange(len(answer))
        return answer[:i] + answer[i].lower() + answer[i + 1 :]
    if kind == "reverse":
        return prompt.split()[1] if answer != prompt.split()[1] else answer[1:] + answer[0]
    shuffled = words[:]
    while len(set(words)) > 1 and shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled) if shuffled != words else " ".join(words + [words[-1]])
