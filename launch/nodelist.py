"""Slurm's compressed host lists (``SLURM_JOB_NODELIST``), expanded without ``scontrol``.

Grammar: comma-separated hosts at the top level; each host may carry bracket groups of
comma-separated numbers and ranges, e.g. ``gpu[01-03,07],cpu5`` or ``rack[1-2]-n[08-09]``
(several groups expand as a cartesian product, first group outermost, as ``scontrol show
hostnames`` does). Zero padding follows the range's first number, as in Slurm.
"""
from __future__ import annotations

import itertools
import re
import sys

_GROUP = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """``gpu[01-03,07],cpu5`` -> ``['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']``."""
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host(pattern))
    if not hosts:
        raise ValueError(f"node list {nodelist!r} names no host")
    return hosts


def head_node(nodelist: str) -> str:
    """The first host: where torchrun's c10d rendezvous store lives."""
    return expand_nodelist(nodelist)[0]


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {text!r}: ']' without '[' at position {index}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth:
        raise ValueError(f"node list {text!r}: '[' is never closed")
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_host(pattern: str) -> list[str]:
    pieces = _GROUP.split(pattern)  # literal, group, literal, group, ..., literal
    choices = [[piece] if i % 2 == 0 else _expand_group(piece, pattern) for i, piece in enumerate(pieces)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_group(group: str, pattern: str) -> list[str]:
    names = []
    for item in group.split(","):
        first, _, last = item.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"node list {pattern!r}: {item!r} is not a number or a range like 01-04")
        width = len(first)
        low, high = int(first), int(last or first)
        if high < low:
            raise ValueError(f"node list {pattern!r}: range {item!r} runs backwards")
        names.extend(f"{n:0{width}d}" for n in range(low, high + 1))
    return names


if __name__ == "__main__":  # python -m launch.nodelist 'gpu[01-03]' prints one host a line
    print("\n".join(expand_nodelist(sys.argv[1])))
