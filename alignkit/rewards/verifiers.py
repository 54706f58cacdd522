"""Rule-based rewards, registered by name. Model output is parsed, never executed.

Arithmetic in answers is read by `safe_arithmetic`, which walks a Python AST that may contain
only numbers, + - * / (or their Unicode forms − × ÷) and parentheses; anything else (names,
calls, attributes, ...) is rejected. Nothing a model writes reaches `eval` or `exec`.

Model output is attacker-controlled text, so the built-in verifiers read it in linear time:
regular expressions without nested quantifiers, `str.rfind` for the answer tags, and length
caps on prompts and responses. A `module:function` verifier runs arbitrary Python from your
environment and is loaded only with `reward.allow_python_verifier: true`.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections import Counter
from fractions import Fraction
from typing import Callable

from ..config import ConfigError
from .toy import toy_reward

Verifier = Callable[[str, str], float]  # (prompt text, response) -> score

MAX_PROMPT_CHARS = 20_000
MAX_RESPONSE_CHARS = 100_000


class UnsafeExpression(ValueError):
    pass


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_UNICODE_OPS = str.maketrans({"−": "-", "×": "*", "÷": "/"})


def safe_arithmetic(expr: str, max_length: int = 200) -> tuple[Fraction, list[int]]:
    """Exact value of an integer arithmetic expression and the numbers it uses."""
    if len(expr) > max_length:
        raise UnsafeExpression("expression too long")
    try:
        tree = ast.parse(expr.translate(_UNICODE_OPS).strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise UnsafeExpression(f"not an arithmetic expression: {getattr(e, 'msg', e)}") from None
    numbers: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise UnsafeExpression("division by zero")
            return _OPS[type(node.op)](left, right)
        raise UnsafeExpression(f"{type(node).__name__} is not allowed")

    return walk(tree), numbers


# Each is linear: `[\d,\s]+` is followed by nothing that could take its characters back, and the
# target is searched for only after the numbers (the old `.*?equals` rescanned the rest per start).
COUNTDOWN_NUMBERS = re.compile(r"numbers\s*\[?([\d,\s]+)", re.IGNORECASE)
COUNTDOWN_TARGET = re.compile(r"equals\s*(-?\d+)", re.IGNORECASE)
MAX_DIGITS = 100


def countdown_task(prompt: str) -> tuple[list[int], int] | None:
    """(numbers given, target) of a Countdown prompt, or None if it is not one."""
    if len(prompt) > MAX_PROMPT_CHARS:
        return None
    numbers = COUNTDOWN_NUMBERS.search(prompt)
    target = COUNTDOWN_TARGET.search(prompt, numbers.end()) if numbers else None
    if not target:
        return None
    given = re.findall(r"\d+", numbers.group(1))
    if any(len(x) > MAX_DIGITS for x in given + [target.group(1).lstrip("-")]):
        return None  # not a Countdown task, and int() refuses numbers over 4,300 digits
    return [int(x) for x in given], int(target.group(1))


def last_answer(response: str) -> str | None:
    """The text inside the last <answer>...</answer> of a response."""
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, end) if end >= 0 else -1
    return response[start + len("<answer>") : end] if start >= 0 else None


def countdown_reward(prompt: str, response: str) -> float:
    """Countdown: 1.0 for an equation in <answer>...</answer> that uses each given number once and
    equals the target; 0.1 for a well-formed answer that does not; 0.0 otherwise."""
    task = countdown_task(prompt)
    answer = last_answer(response) if task and len(response) <= MAX_RESPONSE_CHARS else None
    if answer is None:
        return 0.0
    given, target = task
    try:
        value, used = safe_arithmetic(answer.split("=")[0])
    except UnsafeExpression:
        return 0.0
    return 1.0 if Counter(used) == Counter(given) and value == target else 0.1


VERIFIERS: dict[str, Verifier] = {"toy": toy_reward, "countdown": countdown_reward}


def get_verifier(name: str, allow_python: bool = False) -> Verifier:
    """A registered name, or 'package.module:function' for your own Python function.

    The latter imports and runs code named by the recipe, so it needs `allow_python=True`
    (`reward.allow_python_verifier: true`): a downloaded recipe cannot run `os:system`.
    """
    if name in VERIFIERS:
        return VERIFIERS[name]
    if ":" not in name:
        raise ConfigError(f"reward.rule: unknown verifier {name!r}: use one of {', '.join(VERIFIERS)} or 'module:function'")
    if not allow_python:
        raise ConfigError(
            f"reward.rule: {name!r} names a Python function, which runs code from your environment; "
            "set reward.allow_python_verifier: true to allow it (only for functions you trust)"
        )
    module, func = name.split(":", 1)
    fn = getattr(importlib.import_module(module), func, None)
    if not callable(fn):
        raise ConfigError(f"reward.rule: {func!r} in module {module!r} is not a function")
    return fn
