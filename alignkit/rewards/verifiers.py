"""Rule-based rewards, registered by name. Model output is parsed, never executed.

Arithmetic in answers is read by `safe_arithmetic`, which walks a Python AST that may contain
only numbers, + - * / (or their Unicode forms − × ÷) and parentheses; anything else (names,
calls, attributes, ...) is rejected. Nothing a model writes reaches `eval` or `exec`.

Model output is attacker-controlled text, so the built-in verifiers read it in linear time:
regular expressions without nested quantifiers, `str.rfind` for the answer tags, and length
caps on prompts and responses. A `module:function` verifier runs arbitrary Python from your
environment and is loaded only with `reward.allow_python_verifier`, which only the command line can
set (`--allow-python-verifier`; a recipe or pipeline file cannot, see config.enforce_trust).
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

Verifier = Callable[..., float]
"""(prompt text, response, **columns) -> score. Columns of the prompt's dataset row (e.g. Countdown's
nums and target) are passed by name to the verifiers that take them; a text-only verifier gets none."""

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


def countdown_reward(prompt: str, response: str, nums=None, target=None, tolerance: float | None = None) -> float:
    """Countdown: 1.0 for an equation in <answer>...</answer> that uses each given number once and
    equals the target; 0.1 for a well-formed answer that does not; 0.0 otherwise.

    The numbers and the target come from the dataset row's own columns (`nums`, `target`, as in
    Countdown-Tasks-3to4) when it has them, else from the prompt's wording. `tolerance` None
    compares exactly (fractions); 1e-5 is the course's (TinyZero's) grader, which accepts an
    equation within 1e-5 of the target.
    """
    task = row_task(nums, target) or countdown_task(prompt)
    answer = last_answer(response) if task and len(response) <= MAX_RESPONSE_CHARS else None
    if answer is None:
        return 0.0
    given, goal = task
    try:
        value, used = safe_arithmetic(answer.split("=")[0])
    except UnsafeExpression:
        return 0.0
    close = value == goal if tolerance is None else abs(float(value) - goal) <= tolerance
    return 1.0 if Counter(used) == Counter(given) and close else 0.1


def row_task(nums, target) -> tuple[list[int], int] | None:
    if nums is None or target is None:
        return None
    values = [nums] if isinstance(nums, (int, str)) else list(nums)
    if not all(isinstance(x, int) or (isinstance(x, str) and x.strip().lstrip("-").isdigit() and len(x) <= MAX_DIGITS) for x in values):
        return None
    if not (isinstance(target, int) or (isinstance(target, str) and target.strip().lstrip("-").isdigit() and len(target) <= MAX_DIGITS)):
        return None
    return [int(x) for x in values], int(target)


def check_countdown_row(prompt: str, columns: dict) -> str | None:
    """Why a Countdown prompt row cannot be scored (None: it can)."""
    if row_task(columns.get("nums"), columns.get("target")) or countdown_task(prompt):
        return None
    if "nums" in columns or "target" in columns:
        return "columns 'nums' and 'target' must hold integers (a list of them, and one)"
    return "needs the columns 'nums' and 'target', or a prompt that states 'numbers [...]' and 'equals N'"


countdown_reward.check_row = check_countdown_row


VERIFIERS: dict[str, Verifier] = {"toy": toy_reward, "countdown": countdown_reward}


def get_verifier(name: str, allow_python: bool = False) -> Verifier:
    """A registered name, or 'package.module:function' for your own Python function.

    The latter imports and runs code named by the recipe, so it needs `allow_python=True`
    (`--allow-python-verifier` on the command line): a downloaded recipe cannot run `os:system`.
    """
    if name in VERIFIERS:
        return VERIFIERS[name]
    if ":" not in name:
        raise ConfigError(f"reward.rule: unknown verifier {name!r}: use one of {', '.join(VERIFIERS)} or 'module:function'")
    if not allow_python:
        raise ConfigError(
            f"reward.rule: {name!r} names a Python function, which runs code from your environment; "
            "pass --allow-python-verifier on the command line to allow it (reward.allow_python_verifier; "
            "only for functions you trust, and never from a recipe or pipeline file)"
        )
    module, func = name.split(":", 1)
    fn = getattr(importlib.import_module(module), func, None)
    if not callable(fn):
        raise ConfigError(f"reward.rule: {func!r} in module {module!r} is not a function")
    return fn
