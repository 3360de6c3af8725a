"""The R1 reasoning template: a completion is ``<think>...</think><answer>...</answer>``.

``parse_completion`` is the one place that reads a completion back: the rewards, the rejection
sampler and the evaluations all go through it.

Format rule (what the format reward checks): after stripping surrounding whitespace the text is
exactly one think block followed by one answer block, nothing before, between or after them, and
no tag inside either block. The answer is the text inside the *first* answer block, stripped of
whitespace, whether or not the format holds (so accuracy can be scored on ill-formatted output).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

_WELL_FORMED = re.compile(r"<think>(?P<thought>.*?)</think><answer>(?P<answer>.*?)</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INTEGER = re.compile(r"[+-]?\d+")


def format_completion(thought: str, answer: str) -> str:
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


@dataclass(frozen=True)
class Parsed:
    well_formed: bool
    """Exactly <think>..</think><answer>..</answer>, nothing else (see the module docstring)."""
    answer: Optional[str]
    """Stripped text of the first answer block; None when there is no closed answer block."""
    thought: Optional[str]
    """Text of the think block when well formed, else None."""


def parse_completion(text: str) -> Parsed:
    text = text.strip()
    whole = _WELL_FORMED.fullmatch(text)
    if whole and not any(tag in whole["thought"] + whole["answer"] for tag in TAGS):
        return Parsed(True, whole["answer"].strip(), whole["thought"])
    first = _ANSWER.search(text)
    return Parsed(False, first.group(1).strip() if first else None, None)


def parse_integer(answer: Optional[str]) -> Optional[int]:
    """An optionally signed run of digits ("632", "-5", "+7", "007"), else None ("6 32", "1,000",
    "6.0", "632abc", "")."""
    if answer is None or not _INTEGER.fullmatch(answer):
        return None
    return int(answer)
