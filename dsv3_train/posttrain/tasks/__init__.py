"""Tasks with verifiable answers, generated in code with held-out splits.

``make_problems(task, split, n, seed, **options)`` returns rows: a ``prompt`` plus the columns the
task's rewards read (``answer`` for arithmetic; ``numbers`` and ``target`` for countdown).
"""
from __future__ import annotations

from dsv3_train.posttrain.tasks.arithmetic import SystematicTeacher, addition_problems, addition_thought
from dsv3_train.posttrain.tasks.countdown import countdown_problems, countdown_teacher

PROBLEM_MAKERS = {"arithmetic": addition_problems, "countdown": countdown_problems}
ACCURACY_REWARD = {"arithmetic": "accuracy", "countdown": "countdown"}
"""The reward that says a task's answer is correct."""


def make_problems(task: str, split: str, n: int, seed: int, **options) -> list[dict]:
    if task not in PROBLEM_MAKERS:
        raise ValueError(f"task ({task!r}) must be one of {sorted(PROBLEM_MAKERS)}")
    return PROBLEM_MAKERS[task](split, n, seed, **options)


__all__ = ["ACCURACY_REWARD", "PROBLEM_MAKERS", "SystematicTeacher", "addition_problems", "addition_thought",
           "countdown_problems", "countdown_teacher", "make_problems"]
