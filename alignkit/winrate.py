"""Win-rate statistics: outcomes, bootstrap intervals, an exact sign test, and a length-controlled win rate."""

from __future__ import annotations

import math

import numpy as np


def outcomes(rewards_a, rewards_b, tie_value: float = 0.0) -> np.ndarray:
    """1 where A's reward is higher, 0 where lower, tie_value on equal rewards."""
    a, b = np.asarray(rewards_a, dtype=float), np.asarray(rewards_b, dtype=float)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, tie_value))


def bootstrap_ci(values, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over prompts resampled with replacement."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[float, float]:
    """Intercept and slope of P(y=1) = sigmoid(a + b x), by Newton's method; y may be fractional (ties)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + l2 * w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_feature(length_a, length_b) -> np.ndarray:
    """tanh of the standardised length difference, as AlpacaEval's length control uses: bounded, so
    a few very long answers cannot dominate the fit."""
    diff = np.asarray(length_a, dtype=float) - np.asarray(length_b, dtype=float)
    return np.tanh(diff / (diff.std() or 1.0))


def length_separation(wins, x) -> str | None:
    """Why a logistic fit on x has no finite estimate (outcomes (quasi-)separated by x), or None.

    A row with a fractional outcome (a tie counted 0.5) counts on both sides."""
    wins, x = np.asarray(wins, dtype=float), np.asarray(x, dtype=float)
    won, lost = x[wins > 0], x[wins < 1]
    if len(won) == 0 or len(lost) == 0 or np.ptp(x) == 0:
        return None  # nothing to separate: one outcome only, or no length difference to fit
    if lost.max() <= won.min():
        return "outcomes are separated by length: every win has a larger length difference than every loss"
    if won.max() <= lost.min():
        return "outcomes are separated by length: every win has a smaller length difference than every loss"
    return None


def length_control(wins, length_a, length_b, l2: float = 1e-3) -> tuple[float | None, str | None]:
    """Win rate predicted at zero length difference, or None and the reason it cannot be estimated.

    A logistic model of the outcome on `length_feature` (tanh of the standardised length difference);
    its intercept is the win rate a response as long as the reference's would get. When outcomes are
    (quasi-)separated by length, the fit has no finite optimum and any number would only reflect the
    regularisation, so none is given. With a single outcome (all wins, say) it is the raw win rate.
    """
    wins = np.asarray(wins, dtype=float)
    if len(wins) == 0:
        return None, "no prompts"
    if np.all(wins == wins[0]):
        return float(wins[0]), None
    x = length_feature(length_a, length_b)
    reason = length_separation(wins, x)
    if reason:
        return None, reason
    a, _ = logistic_fit(x, wins, l2=l2)
    return 1 / (1 + math.exp(-a)), None


def length_controlled_win_rate(wins, length_a, length_b) -> float | None:
    """`length_control` without the reason."""
    return length_control(wins, length_a, length_b)[0]


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test of wins against losses (ties dropped): the p-value."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_counts(a, b) -> dict:
    """Two models' values on the same items, item by item (a win: a's is greater; booleans: right
    against wrong): wins, losses and ties of `a`, and the exact two-sided sign test."""
    if len(a) != len(b):
        raise ValueError(f"paired values of different lengths: {len(a)} and {len(b)}")
    wins, losses = int(sum(x > y for x, y in zip(a, b))), int(sum(x < y for x, y in zip(a, b)))
    return {"wins": wins, "losses": losses, "ties": len(a) - wins - losses, "sign_test_p": sign_test(wins, losses)}


def verdict(wins: int, losses: int, level: float = 0.95, a: str = "A", b: str = "B") -> str:
    """One plain sentence from the sign test."""
    p = sign_test(wins, losses)
    return f"{a} is {relation(wins, losses, level)} {b} at {level:.0%} (sign test p={p:.3g})"


def relation(wins: int, losses: int, level: float = 0.95) -> str:
    """'better than', 'worse than' or 'not distinguishable from', by the sign test at `level`."""
    if sign_test(wins, losses) >= 1 - level:
        return "not distinguishable from"
    return "better than" if wins > losses else "worse than"


def summarize(rewards_a, rewards_b, length_a, length_b, tie_value: float = 0.0, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Statistics over prompts: one reward and one length per prompt and side (averaged over a
    prompt's samples by the caller), so the bootstrap resamples prompts."""
    wins = outcomes(rewards_a, rewards_b, tie_value)
    half = outcomes(rewards_a, rewards_b, 0.5)
    ra, rb = np.asarray(rewards_a, float), np.asarray(rewards_b, float)
    lo, hi = bootstrap_ci(wins, n_resamples, seed)
    lc, lc_reason = length_control(wins, length_a, length_b)
    counts = paired_counts(ra.tolist(), rb.tolist())
    n_wins, n_losses = counts["wins"], counts["losses"]
    return {
        "win_rate": float(wins.mean()),
        "ci95": [lo, hi],
        "win_rate_ties_half": float(half.mean()),
        "ci95_ties_half": list(bootstrap_ci(half, n_resamples, seed)),
        "sign_test_p": counts["sign_test_p"],
        "verdict": verdict(n_wins, n_losses),
        "length_controlled_win_rate": lc,
        "length_controlled_note": lc_reason,
        "n": int(len(wins)),
        "wins": n_wins,
        "losses": n_losses,
        "ties": counts["ties"],
        "tie_value": tie_value,
        "mean_reward_a": float(ra.mean()),
        "mean_reward_b": float(rb.mean()),
        "mean_reward_diff": float((ra - rb).mean()),
        "mean_length_a": float(np.mean(length_a)),
        "mean_length_b": float(np.mean(length_b)),
    }


def tally(counts: dict) -> str:
    """'28 wins, 1 loss, 131 ties': a comparison's outcome counts in words."""
    words = (("wins", "win", "wins"), ("losses", "loss", "losses"), ("ties", "tie", "ties"))
    return ", ".join(f"{counts[key]} {one if counts[key] == 1 else many}" for key, one, many in words)
