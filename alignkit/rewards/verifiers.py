"""Rule-based rewards, registered by name. Model output is parsed, never executed.

Arithmetic in answers is read by `safe_arithmetic`, which walks a Python AST that may contain
only numbers, + - * / and parentheses; anything else (names, calls, attributes, ...) is
rejected. Nothing a model writes reaches `eval` or `exec`.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections import Counter
from fractions import Fraction
from typing import Callable

from ..demo.task import toy_reward

Verifier = Callable[[str, str], float]  # (prompt text, response) -> score


class UnsafeExpression(ValueError):
    pass


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def safe_arithmetic(expr: str, max_length: int = 200) -> tuple[Fraction, list[int]]:
    """Exact value of an integer arithmetic expression and the numbers it uses."""
    if len(expr) > max_length:
        raise UnsafeExpression("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise UnsafeExpression(f"not an arithmetic expression: {e.msg}") from None
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


COUNTDOWN_PROMPT = re.compile(r"numbers\s*\[?([\d,\s]+)\]?.*?equals\s*(-?\d+)", re.IGNORECASE | re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def countdown_reward(prompt: str, response: str) -> float:
    """Countdown: 1.0 for an equation in <answer>...</answer> that uses each given number once and
    equals the target; 0.1 for a well-formed answer that does not; 0.0 otherwise."""
    task = COUNTDOWN_PROMPT.search(prompt)
    answers = ANSWER.findall(response)
    if not task or not answers:
        return 0.0
    given = [int(x) for x in re.findall(r"\d+", task.group(1))]
    target = int(task.group(2))
    equation = answers[-1].split("=")[0]
    try:
        value, used = safe_arithmetic(equation)
    except UnsafeExpression:
        return 0.0
    return 1.0 if Counter(used) == Counter(given) and value == target else 0.1


VERIFIERS: dict[str, Verifier] = {"toy": toy_reward, "countdown": countdown_reward}


def get_verifier(name: str) -> Verifier:
    """A registered name, or 'package.module:function' for your own (trusted) Python function."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    if ":" in name:
        module, func = name.split(":", 1)
        return getattr(importlib.import_module(module), func)
    raise ValueError(f"unknown verifier {name!r}: use one of {', '.join(VERIFIERS)} or 'module:function'")
