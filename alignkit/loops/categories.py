"""Pure rules of the data loops: categories, loss rates, the weakest pick, text de-duplication, diversity.

Everything here is a small function of plain values (strings, lists, numpy arrays) with a
hand-computed test (tests/test_curriculum.py, tests/test_augment.py):

  keyword rules      "name: word | phrase | ..." lines; a prompt gets the first rule (in order) with
                     a keyword as a whole word or phrase (case-insensitive), else "other"
  parse_category     a classifier's answer, parsed strictly: after trimming whitespace, quotes, a
                     trailing full stop and case, it must equal one category name, else None
  category_rates     wins / losses / ties and the loss rate per category of eval rows
  pick_weakest       the weakest categories by loss rate (rule and tie-break in its docstring)
  normalize          text for duplicate detection: NFKC, case-folded, punctuation dropped, spaces collapsed
  greedy_max_min / threshold_select   the diversity filters on unit-length embeddings

Simplified: keywords match words, not meanings; the near-duplicate rule of text is equality after
normalisation (paraphrases are the embeddings' job).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

import numpy as np

from ..config import ConfigError

OTHER = "other"
"""The category of a prompt no rule matches, and of a classifier answer that names no category."""


# --------------------------------------------------------------------------- categories


def parse_keyword_rules(lines: list[str], key: str = "categorize.keywords") -> list[tuple[str, list[str]]]:
    """[(category, [keyword, ...])] from lines "category: word | two words | ...", in order."""
    rules, seen = [], set()
    for k, line in enumerate(lines):
        name, sep, words = str(line).partition(":")
        name = name.strip()
        kws = [w.strip().lower() for w in words.split("|") if w.strip()]
        if not sep or not name or not kws:
            raise ConfigError(f"{key}[{k}]: {line!r} is not allowed; expected 'category: keyword | keyword ...'")
        if name in seen:
            raise ConfigError(f"{key}[{k}]: category {name!r} is given twice; put all its keywords on one line")
        seen.add(name)
        rules.append((name, kws))
    return rules


def keyword_category(text: str, rules: list[tuple[str, list[str]]]) -> str:
    """The first rule with a keyword in `text` as a whole word or phrase (case-insensitive), else OTHER."""
    low = " ".join(text.lower().split())
    for name, kws in rules:
        for kw in kws:
            if re.search(r"(?<!\w)" + re.escape(" ".join(kw.split())) + r"(?!\w)", low):
                return name
    return OTHER


def parse_category(answer, categories: list[str]) -> str | None:
    """The category a classifier named, or None. Strict: the whole answer (whitespace, surrounding
    quotes or backticks, one trailing full stop and case aside) must be one category's name; an
    answer naming two, explaining itself, or naming none is None."""
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    for _ in range(2):  # "Coding." and "Coding". and ("Coding.")
        text = text[:-1].strip() if text.endswith(".") else text
        text = text.strip("\"'`").strip()
    by_name = {c.casefold(): c for c in categories}
    return by_name.get(text.casefold())


# --------------------------------------------------------------------------- loss rates


def category_rates(rows: list[tuple[str, str]]) -> dict[str, dict]:
    """{category: {n, wins, losses, ties, loss_rate}} from (category, outcome) pairs, outcome one of
    win / loss / tie (model A against the reference); loss_rate = losses / n (ties are not losses)."""
    counts: dict[str, Counter] = {}
    for category, outcome in rows:
        if outcome not in ("win", "loss", "tie"):
            raise ValueError(f"outcome {outcome!r} is not win, loss or tie")
        counts.setdefault(category, Counter())[outcome] += 1
    return {c: {"n": sum(k.values()), "wins": k["win"], "losses": k["loss"], "ties": k["tie"],
                "loss_rate": k["loss"] / sum(k.values())} for c, k in sorted(counts.items())}


def pick_weakest(rates: dict[str, dict], k: int, min_prompts: int = 1, min_loss_rate: float = 0.0,
                 exclude: tuple[str, ...] = (OTHER,)) -> tuple[list[str], dict[str, str]]:
    """(the weakest categories, why each other category was not picked).

    Eligible: at least `min_prompts` eval prompts, a loss rate of at least `min_loss_rate`, not in
    `exclude`. Ranked by loss rate (highest first); ties by more prompts first (more evidence), then
    by name; the first k are picked."""
    why: dict[str, str] = {}
    eligible = []
    for c, r in rates.items():
        if c in exclude:
            why[c] = "excluded"
        elif r["n"] < min_prompts:
            why[c] = f"{r['n']} prompts < min_prompts {min_prompts}"
        elif r["loss_rate"] < min_loss_rate:
            why[c] = f"loss rate {r['loss_rate']:.3f} < min_loss_rate {min_loss_rate}"
        else:
            eligible.append(c)
    ranked = sorted(eligible, key=lambda c: (-rates[c]["loss_rate"], -rates[c]["n"], c))
    for rank, c in enumerate(ranked[k:], start=k + 1):
        why[c] = f"rank {rank} of {len(ranked)} (k = {k})"
    return ranked[:k], why


# --------------------------------------------------------------------------- text duplicates


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(ch if not unicodedata.category(ch).startswith(("P", "S")) else " " for ch in text)
    return " ".join(kept.split())


def drop_duplicates(texts: list[str], against: list[str] = ()) -> tuple[list[int], Counter]:
    """(indices of texts kept, in order; counts of what was dropped): a text equal to an earlier one
    ("exact duplicate"), equal after `normalize` ("near duplicate (normalised text)"), or equal after
    normalisation to one of `against` ("same as a seed or eval prompt") is dropped."""
    reference = {normalize(a) for a in against}
    raw, norm, kept, dropped = set(), set(), [], Counter()
    for i, t in enumerate(texts):
        key = normalize(t)
        if t in raw:
            dropped["exact duplicate"] += 1
        elif key in reference:
            dropped["same as a seed or eval prompt"] += 1
        elif key in norm:
            dropped["near duplicate (normalised text)"] += 1
        else:
            kept.append(i)
        raw.add(t)
        norm.add(key)
    return kept, dropped


# --------------------------------------------------------------------------- diversity (unit vectors)


def greedy_max_min(candidates: np.ndarray, nearest_seed: np.ndarray, target: int, threshold: float
                   ) -> tuple[list[int], list[float]]:
    """Farthest-point selection on unit-length rows (cosine = dot product).

    `nearest_seed[i]`: candidate i's highest cosine similarity to the seed set (-1 with no seeds).
    Each step picks the candidate whose highest similarity to the seeds and to those picked so far
    is lowest (ties: the lower index); it stops at `target` picks, or when that similarity would be
    above `threshold`. Returns (picked indices in pick order, each one's similarity when picked).
    Cost: target x n dot products, vectorised."""
    n = len(candidates)
    closest = np.asarray(nearest_seed, dtype=np.float64).copy()
    taken = np.zeros(n, dtype=bool)
    picked, sims = [], []
    while len(picked) < min(target, n):
        masked = np.where(taken, np.inf, closest)
        i = int(np.argmin(masked))
        if masked[i] > threshold:
            break
        picked.append(i)
        sims.append(float(closest[i]))
        taken[i] = True
        closest = np.maximum(closest, candidates @ candidates[i])
    return picked, sims


def threshold_select(neighbours: list[list[int]], nearest_seed: np.ndarray, threshold: float, target: int
                     ) -> tuple[list[int], Counter]:
    """In candidate order, keep a candidate unless its nearest seed is above `threshold` or one of its
    `neighbours` (the earlier-or-later candidates above the threshold) was kept before it; stop at
    `target`. Returns (kept indices, dropped counts by reason)."""
    kept, kept_set, dropped = [], set(), Counter()
    for i in range(len(neighbours)):
        if len(kept) >= target:
            dropped["over the target count"] += 1
        elif nearest_seed[i] > threshold:
            dropped["too similar to a seed"] += 1
        elif any(j in kept_set for j in neighbours[i]):
            dropped["too similar to a kept candidate"] += 1
        else:
            kept.append(i)
            kept_set.add(i)
    return kept, dropped


def allocate(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers, the larger ones first (e.g. 7, 3 -> 3, 2, 2)."""
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def requests_for(count: int, per_request: int) -> int:
    return math.ceil(count / per_request) if count > 0 else 0
