"""Multi-digit addition with a column-by-column chain of thought, and a teacher that errs.

A problem ``347+285=`` is solved right to left, one column per step, each step writing the column
sum and the partial result so far::

    <think>7+5=12>2,4+8+1=13>32,3+2+1=6>632</think><answer>632</answer>

``SystematicTeacher`` writes exactly this, except that in one fixed situation -- the carry *into*
column ``drop_column`` (0 = units) -- it forgets the ``+1`` with probability ``rate`` and carries on
consistently from the wrong sum. Its chain of thought is well formed and locally correct
everywhere else, so a student imitating it learns the same blind spot.

Splits are fixed by a hash of the operand pair (``test_percent`` of all pairs are held out), so a
held-out problem never appears in a training set whatever the seeds.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from dsv3_train.posttrain.template import format_completion

SPLITS = ("train", "test")


def split_of(a: int, b: int, test_percent: int) -> str:
    """'test' for a fixed test_percent of operand pairs, else 'train' (a stable multiplicative hash)."""
    key = (a * 1_000_003 + b) * 2_654_435_761 % 2**32
    return "test" if key % 100 < test_percent else "train"


def addition_problems(split: str, n: int, seed: int, digits: int = 3, test_percent: int = 10) -> list[dict]:
    """n distinct problems of the split: rows {"prompt": "347+285=", "answer": "632", "a": 347, "b": 285}."""
    if split not in SPLITS:
        raise ValueError(f"split ({split!r}) must be one of {SPLITS}")
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    share = test_percent if split == "test" else 100 - test_percent
    available = (high - low + 1) ** 2 * share // 100
    if n > available // 2:
        raise ValueError(f"{n} distinct {digits}-digit {split} problems asked for but only ~{available} "
                         f"exist: ask for at most {available // 2} or use more digits")
    rng, rows, seen = random.Random(f"addition-{split}-{seed}"), [], set()
    while len(rows) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (a, b) in seen or split_of(a, b, test_percent) != split:
            continue
        seen.add((a, b))
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "a": a, "b": b})
    return rows


def addition_thought(a: int, b: int, dropped_carry_column: Optional[int] = None) -> tuple[str, str]:
    """(chain of thought, answer) for a + b; the carry into dropped_carry_column is forgotten."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    width = max(len(xs), len(ys))
    steps, partial, carry = [], "", 0
    for column in range(width):
        x = int(xs[column]) if column < len(xs) else 0
        y = int(ys[column]) if column < len(ys) else 0
        if column == dropped_carry_column:
            carry = 0
        total = x + y + carry
        last = column == width - 1
        partial = (str(total) if last else str(total % 10)) + partial
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}>{partial}")
        carry = total // 10
    return ",".join(steps), partial


def has_carry_into(a: int, b: int, column: int) -> bool:
    """Whether the correct addition carries into ``column`` (0 = units never does)."""
    modulus = 10 ** column
    return column > 0 and (a % modulus + b % modulus) >= modulus


@dataclass
class SystematicTeacher:
    """Correct column-wise chain of thought, but the carry into ``drop_column`` is forgotten with
    probability ``rate`` (a fixed situation, hence a systematic mistake)."""

    drop_column: int = 2
    rate: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"teacher rate ({self.rate}) must be in [0, 1]")
        self.rng = random.Random(f"teacher-{self.seed}")

    def complete(self, row: dict) -> str:
        a, b = row["a"], row["b"]
        drop = has_carry_into(a, b, self.drop_column) and self.rng.random() < self.rate
        thought, answer = addition_thought(a, b, self.drop_column if drop else None)
        return format_completion(thought, answer)
