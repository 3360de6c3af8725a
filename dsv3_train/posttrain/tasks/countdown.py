"""Countdown: reach a target with the given numbers, each used exactly once, with + - * /.

Problems are built backwards from a random expression tree over the numbers (intermediate values
kept positive integers), so every problem has a solution; the reward checks any answer
expression exactly (``countdown_reward`` in rewards.py). Splits by a hash of (numbers, target).
"""
from __future__ import annotations

import random

from dsv3_train.posttrain.template import format_completion

_OPERATORS = "+-*/"


def split_of(numbers: tuple[int, ...], target: int, test_percent: int) -> str:
    key = hash_ints(tuple(sorted(numbers)) + (target,))
    return "test" if key % 100 < test_percent else "train"


def hash_ints(values: tuple[int, ...]) -> int:
    """A stable (process-independent) hash of a tuple of ints."""
    key = 1469598103934665603
    for value in values:
        key = (key ^ (value & 0xFFFFFFFF)) * 1099511628211 % 2**64
    return key


def _combine(rng: random.Random, terms: list[tuple[int, str]]) -> tuple[int, str, list[str]] | None:
    """Fold the (value, expression) terms in random pairs until one is left; None when an
    operation would leave the positive integers. Returns (value, expression, steps)."""
    terms, steps = list(terms), []
    while len(terms) > 1:
        i, j = rng.sample(range(len(terms)), 2)
        (x, ex), (y, ey) = terms[i], terms[j]
        op = rng.choice(_OPERATORS)
        if op == "-" and x <= y or op == "/" and (y == 0 or x % y):
            return None
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
        steps.append(f"{x}{op}{y}={value}")
        terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [(value, f"({ex}{op}{ey})")]
    value, expression = terms[0]
    return value, expression[1:-1] if expression.startswith("(") else expression, steps


def countdown_problems(split: str, n: int, seed: int, count: int = 3, largest: int = 20,
                       max_target: int = 200, test_percent: int = 10) -> list[dict]:
    """n distinct rows {"prompt": "3,7,12>33=", "numbers": [3, 7, 12], "target": 33, "solution": ...}."""
    rng, rows, seen = random.Random(f"countdown-{split}-{seed}"), [], set()
    for _ in range(200 * n):
        if len(rows) == n:
            break
        numbers = tuple(rng.randint(1, largest) for _ in range(count))
        solved = _combine(rng, [(x, str(x)) for x in numbers])
        if solved is None or not 1 <= solved[0] <= max_target:
            continue
        target, expression, steps = solved
        key = (tuple(sorted(numbers)), target)
        if key in seen or split_of(numbers, target, test_percent) != split:
            continue
        seen.add(key)
        rows.append({"prompt": f"{','.join(map(str, numbers))}>{target}=", "numbers": list(numbers),
                     "target": target, "solution": expression, "steps": ",".join(steps)})
    if len(rows) < n:
        raise ValueError(f"found only {len(rows)} of {n} countdown problems: raise largest or max_target")
    return rows


def countdown_teacher(row: dict) -> str:
    """The construction steps as the chain of thought and the solution expression as the answer."""
    return format_completion(row["steps"], row["solution"])
