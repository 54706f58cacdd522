"""The demo's toy instruction-following task: prompts, the slips scraped chats make, near misses.

Five kinds of short instructions with one correct answer each, over a few hundred generated
pseudo-words (`WORDS`) so that the character-level kinds (upper-case, spell backwards) must be
learnt as skills, not as a lookup of 30 words. The solver and verifier (PATTERNS, solve,
toy_reward) live in alignkit.rewards.toy, beside the other verifiers.

`habit` is the world's content noise: on one visible sub-type of each kind (a sum that carries,
four repetitions, a word that starts with a vowel, five numbers to sort) scraped chats make one
typical slip (drop the carry, repeat three times, capitalise only the first letter, write the word
forwards, sort descending). Deliberately simplified: every slip is a fixed rule, so a model can
learn it, and unlearn it, as a rule.
"""

from __future__ import annotations

import random

from ..rewards.toy import PATTERNS, solve, toy_reward

__all__ = ["KINDS", "PATTERNS", "WORDS", "habit", "in_habit", "make_dataset", "make_example", "near_miss", "solve",
           "toy_reward"]

REAL_WORDS = (
    "cat dog sun tree book fish bird moon star rain lamp door cake milk ship road "
    "leaf frog king ring wolf bell coin rose snow wind fire lake hill gold"
).split()
N_WORDS = 400
"""Words of the world: the 30 real ones above and generated pseudo-words of 3 to 5 letters."""
VOWELS, CONSONANTS = "aeiou", "bcdfghklmnprstvwz"
SHAPES = ("cvc", "cvcc", "ccvc", "cvcv", "cvcvc", "vcvc", "vcc", "vccv")


def make_words(n: int = N_WORDS, seed: int = 2026) -> tuple[str, ...]:
    """`n` distinct lower-case words: REAL_WORDS, then seeded consonant/vowel shapes (fixed for the world)."""
    rng, words = random.Random(seed), list(REAL_WORDS)
    seen = set(words)
    while len(words) < n:
        w = "".join(rng.choice(VOWELS if c == "v" else CONSONANTS) for c in rng.choice(SHAPES))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(words)


WORDS = make_words()
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
        prompt = f"What is {rng.randint(0, 99)} plus {rng.randint(0, 9)}?"
    else:
        prompt = "Sort these numbers: " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
    return {"prompt": prompt, "completion": solve(prompt), "category": kind}


def all_prompts(kind: str) -> list[str]:
    """Every prompt of a kind with finitely many (all but sort), in a fixed order."""
    if kind == "repeat":
        return [f"Repeat the word {w} {n} times." for w in WORDS for n in (2, 3, 4)]
    if kind == "upper":
        return [f"Write {w} in capital letters." for w in WORDS]
    if kind == "reverse":
        return [f"Spell {w} backwards." for w in WORDS]
    if kind == "add":
        return [f"What is {a} plus {b}?" for a in range(100) for b in range(10)]
    raise ValueError(f"{kind}: not a finite kind")


def make_dataset(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, KINDS[i % len(KINDS)]) for i in range(n)]


def kind_of(prompt: str) -> str:
    return next(k for k, p in PATTERNS.items() if p.match(prompt))


def in_habit(prompt: str) -> bool:
    """Whether a prompt is of the sub-type on which scraped chats make their kind's typical slip."""
    kind, m = kind_of(prompt), None
    m = PATTERNS[kind].match(prompt)
    if kind == "add":
        return int(m.group(1)) % 10 + int(m.group(2)) >= 10
    if kind == "repeat":
        return m.group(2) == "4"
    if kind in ("upper", "reverse"):
        return m.group(1)[0] in VOWELS
    return len(m.group(1).split()) == 5 and len(set(m.group(1).split())) > 1


def habit(prompt: str) -> str:
    """The typical slip on a habit prompt (`in_habit`): always a wrong answer there."""
    kind, m = kind_of(prompt), PATTERNS[kind_of(prompt)].match(prompt)
    if kind == "add":
        a, b = int(m.group(1)), int(m.group(2))
        return str(a - a % 10 + (a + b) % 10)  # the carry dropped: 27 plus 5 -> 22
    if kind == "repeat":
        return " ".join([m.group(1)] * 3)
    if kind == "upper":
        return m.group(1).capitalize()
    if kind == "reverse":
        return m.group(1)
    return " ".join(sorted(m.group(1).split(), key=int, reverse=True))


def near_miss(prompt: str, rng: random.Random) -> str:
    """A plausible wrong answer (the kind a half-trained model gives), for preference pairs and noise;
    on a habit prompt, half the time its kind's typical slip."""
    answer = solve(prompt)
    if in_habit(prompt) and rng.random() < 0.5:
        return habit(prompt)
    words = answer.split()
    kind = kind_of(prompt)
    if kind == "add":
        wrong = str(int(answer) + rng.choice([-2, -1, 1, 2]))
        return wrong if wrong != answer and not wrong.startswith("-") else str(int(answer) + 1)
    if kind == "repeat":
        return " ".join(words + [words[0]] if rng.random() < 0.5 or len(words) < 3 else words[:-1])
    if kind == "upper":
        i = rng.randrange(len(answer))
        return answer[:i] + answer[i].lower() + answer[i + 1 :]
    if kind == "reverse":
        w = prompt.split()[1]
        i = rng.randrange(len(w) - 1)
        swapped = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        return swapped if swapped != answer else (w if w != answer else answer + answer[-1])
    shuffled = words[:]
    while len(set(words)) > 1 and shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled) if shuffled != words else " ".join(words + [words[-1]])
