"""Win-rate statistics: outcomes, bootstrap intervals, and a length-controlled win rate."""

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


def length_controlled_win_rate(wins, length_a, length_b) -> float:
    """Win rate predicted at zero length difference (in the spirit of AlpacaEval's length control).

    A logistic model of the outcome on the standardised length difference; its intercept is the
    win rate a response of the same length as the reference would get.
    """
    diff = np.asarray(length_a, dtype=float) - np.asarray(length_b, dtype=float)
    scale = diff.std() or 1.0
    a, _ = logistic_fit(diff / scale, np.asarray(wins, dtype=float))
    return 1 / (1 + math.exp(-a))


def summarize(rewards_a, rewards_b, length_a, length_b, tie_value: float = 0.0, n_resamples: int = 2000, seed: int = 0) -> dict:
    wins = outcomes(rewards_a, rewards_b, tie_value)
    ra, rb = np.asarray(rewards_a, float), np.asarray(rewards_b, float)
    lo, hi = bootstrap_ci(wins, n_resamples, seed)
    return {
        "win_rate": float(wins.mean()),
        "ci95": [lo, hi],
        "length_controlled_win_rate": length_controlled_win_rate(wins, length_a, length_b),
        "n": int(len(wins)),
        "wins": int((ra > rb).sum()),
        "losses": int((ra < rb).sum()),
        "ties": int((ra == rb).sum()),
        "tie_value": tie_value,
        "mean_reward_a": float(ra.mean()),
        "mean_reward_b": float(rb.mean()),
        "mean_reward_diff": float((ra - rb).mean()),
        "mean_length_a": float(np.mean(length_a)),
        "mean_length_b": float(np.mean(length_b)),
    }
