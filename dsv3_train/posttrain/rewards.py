"""Rule-based rewards: ``f(prompts, completions, **columns) -> list[float | None]``.

A reward gets the batch's prompts and completions (decoded text) and, as keyword arguments, the
dataset's other columns (``answer``, ``numbers``, ``target`` ...), one value per completion. It
returns one score per completion, or None where it does not apply (the sample is skipped by it).

``RewardPool`` runs several rewards in worker processes with a deadline and sums them with
weights: total_i = sum_k w_k r_k,i over the rewards that scored sample i (None when none did).
A reward that raises, returns the wrong number of scores or misses the deadline scores None for
the whole batch; the pool is then restarted, so a hung reward never hangs training.
"""
from __future__ import annotations

import ast
import importlib
import multiprocessing
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional, Sequence

from dsv3_train.posttrain.template import parse_completion, parse_integer

Score = Optional[float]
RewardFn = Callable[..., list[Score]]


# ----------------------------------------------------------------------------- rewards
def accuracy_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, **_) -> list[Score]:
    """1 when the first answer block holds an integer equal to the true answer, else 0 (None when
    the row has no answer). Tags around the answer are required; text outside them is ignored."""
    scores = []
    for completion, truth in zip(completions, answer):
        if truth is None:
            scores.append(None)
            continue
        value = parse_integer(parse_completion(completion).answer)
        scores.append(float(value is not None and value == int(truth)))
    return scores


def format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[Score]:
    """1 for exactly ``<think>..</think><answer>..</answer>`` (see template.py), else 0."""
    return [float(parse_completion(c).well_formed) for c in completions]


def countdown_reward(prompts: Sequence[str], completions: Sequence[str], numbers: Sequence,
                     target: Sequence, **_) -> list[Score]:
    """1 when the answer is an expression of + - * / and parentheses that uses every given number
    exactly once and equals the target exactly, else 0."""
    return [float(_countdown_value(parse_completion(c).answer, nums) == Fraction(t))
            for c, nums, t in zip(completions, numbers, target)]


_ALLOWED_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
                ast.Div: Fraction.__truediv__}


def _countdown_value(expression: Optional[str], numbers: Sequence[int]) -> Optional[Fraction]:
    """Exact value of a countdown answer, None when it is not a valid use of the numbers."""
    if expression is None or len(expression) > 200:
        return None
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_OPS:
            return _ALLOWED_OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not allowed in a countdown answer: {ast.dump(node)}")

    try:
        result = value(tree)
    except (ValueError, ZeroDivisionError):
        return None
    return result if Counter(used) == Counter(numbers) else None


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward,
                                "countdown": countdown_reward}


def resolve_reward(name: str) -> RewardFn:
    """A registered reward name, or ``package.module:function`` (module-level, so workers can import it)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"reward ({name!r}) is neither registered ({sorted(REWARDS)}) nor an import "
                         f"path 'package.module:function'")
    module, function = name.split(":", 1)
    return getattr(importlib.import_module(module), function)


def weighted_sum(scores: dict[str, list[Score]], weights: dict[str, float]) -> list[Score]:
    """Per sample sum_k w_k r_k over the rewards that scored it; None where none did."""
    columns = list(scores.values())
    n = len(columns[0]) if columns else 0
    totals: list[Score] = []
    for i in range(n):
        parts = [weights[name] * values[i] for name, values in scores.items() if values[i] is not None]
        totals.append(sum(parts) if parts else None)
    return totals


# ----------------------------------------------------------------------------- the pool
@dataclass
class RewardSpec:
    name: str
    """Registered reward (accuracy, format, countdown) or 'package.module:function'."""
    weight: float = 1.0
    """Its weight in the total."""


@dataclass
class RewardScores:
    total: list[Score]
    by_name: dict[str, list[Score]]
    failed: dict[str, str] = field(default_factory=dict)
    """Reward name -> why it scored None for the batch ('timeout' or the error)."""


def _call_reward(name: str, prompts, completions, columns) -> list[Score]:
    return resolve_reward(name)(prompts, completions, **columns)


class RewardPool:
    """Weighted rewards, each batch scored in worker processes under one deadline.

    ``workers=0`` scores in this process, without a deadline (for debugging). Use it as a context
    manager, or call ``close()``: the workers are terminated then.
    """

    def __init__(self, specs: Sequence[RewardSpec], workers: int = 1, timeout_s: float = 10.0,
                 start_method: str = "spawn"):
        if not specs:
            raise ValueError("no rewards given: add at least one RewardSpec (e.g. accuracy)")
        for spec in specs:
            resolve_reward(spec.name)  # fail now, not in a worker
        self.specs, self.workers, self.timeout_s = list(specs), workers, timeout_s
        self.context = multiprocessing.get_context(start_method)
        self._pool = None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, Sequence]
                 ) -> RewardScores:
        prompts, completions = list(prompts), list(completions)
        columns = {key: list(values) for key, values in columns.items()}
        by_name, failed = {}, {}
        if self.workers == 0:
            results = {s.name: (lambda s=s: _call_reward(s.name, prompts, completions, columns)) for s in self.specs}
        else:
            pool = self._get_pool()
            pending = {s.name: pool.apply_async(_call_reward, (s.name, prompts, completions, columns))
                       for s in self.specs}
            deadline = time.monotonic() + self.timeout_s
            results = {name: (lambda job=job: job.get(max(0.0, deadline - time.monotonic())))
                       for name, job in pending.items()}
        for name, result in results.items():
            try:
                scores = result()
                if len(scores) != len(completions):
                    raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
                by_name[name] = [None if s is None else float(s) for s in scores]
            except multiprocessing.TimeoutError:
                failed[name] = "timeout"
            except Exception as error:  # noqa: BLE001 - a broken reward must not stop training
                failed[name] = f"{type(error).__name__}: {error}"
            if name in failed:
                by_name[name] = [None] * len(completions)
                warnings.warn(f"reward {name} scored None for a batch of {len(completions)}: {failed[name]}")
        if "timeout" in failed.values():
            self._stop_pool()  # its workers may still be busy with the hung call
        total = weighted_sum(by_name, {s.name: s.weight for s in self.specs})
        return RewardScores(total, by_name, failed)

    def _get_pool(self):
        if self._pool is None:
            self._pool = self.context.Pool(self.workers)
        return self._pool

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        self._stop_pool()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
