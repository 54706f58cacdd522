"""The demo's toy instruction-following task: prompts, the slips scraped chats make, near misses.

Four kinds of short instructions with one correct answer each, over 64 everyday words that the
demo's tokenizer keeps whole (one token each): repeat a word, reverse the order of a few words,
name the last word of a list, count the words of a list. Every kind is a copying or
rearranging skill that a tiny transformer learns as a skill (induction), so prompts it never saw
are answered as well as seen ones; the prompt space is large (all but repeat have thousands of
prompts), so held-out, RL and preference prompts can all be distinct.

`habit` is the world's content noise: on one visible sub-type of each kind (four repetitions, a
five-item list) scraped chats make one typical slip (repeat once too few, keep the order, name the
second-to-last word for the last, count one short). Deliberately simplified: every slip is a fixed
rule, so a model can learn it, and unlearn it, as a rule. The solver and verifier (PATTERNS, solve,
toy_reward) live in alignkit.rewards.toy, beside the other verifiers; it also knows the kinds of
earlier demo worlds (upper-case, spell backwards, add, sort, member), which tests still use. Why these
four and not others (sorting digits, naming the first word, copying, membership): docs/demo.md.
"""

from __future__ import annotations

import random

from ..rewards.toy import PATTERNS, solve, toy_reward

__all__ = ["KINDS", "PATTERNS", "WORDS", "habit", "in_habit", "kind_of", "make_dataset", "make_example", "near_miss",
           "solve", "toy_reward"]

WORDS = tuple(
    "cat dog sun tree book fish bird moon star rain lamp door cake milk ship road leaf frog king ring "
    "wolf bell coin rose snow wind fire lake hill gold apple bread chair cloud drum egg fox goat hat ice "
    "jam kite lion map nest owl pen queen rock sock tent vase whale yarn zebra bear box cup desk fork "
    "gate horn jar key".split()
)
KINDS = ("repeat", "flip", "last", "count")
REPEATS = (2, 3, 4, 5)
"""How many times a repeat prompt asks for its word (4 is the habit sub-type)."""
LIST_LENGTHS = (2, 3, 4, 5)
"""Items in a flip, last or count prompt (5 is the habit sub-type)."""


def make_example(rng: random.Random, kind: str | None = None) -> dict:
    kind = kind or rng.choice(KINDS)
    if kind == "repeat":
        w, n = rng.choice(WORDS), rng.choice(REPEATS)
        prompt = f"Repeat the word {w} {n} times."
    elif kind in ("flip", "last", "count"):
        items = " ".join(rng.choice(WORDS) for _ in range(rng.choice(LIST_LENGTHS)))
        lead = {"flip": "Reverse the order of:", "last": "What is the last word of:", "count": "How many words are in:"}
        prompt = f"{lead[kind]} {items}"
    else:
        raise ValueError(f"{kind}: not a kind of the demo's task {KINDS}")
    return {"prompt": prompt, "completion": solve(prompt), "category": kind}


def all_prompts(kind: str) -> list[str]:
    """Every prompt of a kind with few (repeat: 256), in a fixed order."""
    if kind == "repeat":
        return [f"Repeat the word {w} {n} times." for w in WORDS for n in REPEATS]
    raise ValueError(f"{kind}: not a finite kind")


def make_dataset(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, KINDS[i % len(KINDS)]) for i in range(n)]


def kind_of(prompt: str) -> str:
    return next(k for k, p in PATTERNS.items() if p.match(prompt))


def _items(prompt: str) -> tuple[str, list[str]]:
    kind = kind_of(prompt)
    m = PATTERNS[kind].match(prompt)
    if kind == "repeat":
        return kind, [m.group(1)] * int(m.group(2))
    return kind, m.group(1).split()


def in_habit(prompt: str) -> bool:
    """Whether a prompt is of the sub-type on which scraped chats make their kind's typical slip (and the
    slip is wrong there: a five-item list whose slip would give the right answer is not one)."""
    kind, items = _items(prompt)
    if kind == "repeat":
        return len(items) >= 4
    return len(items) == 5 and habit_answer(kind, items) != solve(prompt)


def habit_answer(kind: str, items: list[str]) -> str:
    if kind == "repeat":
        return " ".join(items[:-1])
    if kind == "flip":
        return " ".join(items)
    if kind == "last":
        return items[-2]
    return str(len(items) - 1)


def habit(prompt: str) -> str:
    """The typical slip on a habit prompt (`in_habit`): always a wrong answer there."""
    return habit_answer(*_items(prompt))


def near_miss(prompt: str, rng: random.Random) -> str:
    """A plausible wrong answer (the kind a half-trained model gives), for preference pairs and noise;
    on a habit prompt, half the time its typical slip. Never the right answer."""
    answer = solve(prompt)
    if in_habit(prompt) and rng.random() < 0.5:
        return habit(prompt)
    kind, items = _items(prompt)
    words = answer.split()
    if kind == "repeat":
        wrong = words + words[:1] if rng.random() < 0.5 else words[:-1]
    elif kind == "count":
        wrong = [str(len(items) + rng.choice((-1, 1)))]
    elif kind == "last":
        others = [w for w in items if w != answer]
        wrong = [rng.choice(others)] if others else [answer, answer]
    else:  # flip: two neighbours swapped, else an item repeated
        spots = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
        wrong = words[:]
        if spots:
            i = rng.choice(spots)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        else:
            wrong.append(words[-1])
    return " ".join(wrong)
