"""The demo's toy instruction-following task: data, and plausible wrong answers for preference pairs.

Five kinds of short instructions with one correct answer each. The solver and verifier
(PATTERNS, solve, toy_reward) live in alignkit.rewards.toy, beside the other verifiers.
"""

from __future__ import annotations

import random

from ..rewards.toy import PATTERNS, solve, toy_reward

__all__ = ["KINDS", "PATTERNS", "WORDS", "make_dataset", "make_example", "near_miss", "solve", "toy_reward"]

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
