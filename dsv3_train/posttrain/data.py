"""Prompt/completion data: JSONL files, token encoding, padded and packed batches.

A JSONL row is ``{"prompt": ..., "completion": ...}`` plus any columns the rewards read. The
prompt is wrapped by ``Template`` (a chat template: text before and after the user's prompt) and
the completion is followed by EOS. Targets are IGNORE_INDEX everywhere except on completion
tokens (EOS included), so the loss is on the completion only.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from dsv3_train.model.transformer import IGNORE_INDEX
from dsv3_train.posttrain.tokenizer import CharTokenizer


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


class ShuffledEpochs:
    """Indices 0..n-1 drawn k at a time from shuffled epochs; a fresh epoch is appended whenever
    fewer than k remain."""

    def __init__(self, n: int, seed: str):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        while len(self.order) < k:
            epoch = list(range(self.n))
            self.rng.shuffle(epoch)
            self.order += epoch
        taken, self.order = self.order[:k], self.order[k:]
        return taken


@dataclass(frozen=True)
class Template:
    """How a prompt is shown to the model: ``prefix + prompt + suffix`` (the chat template)."""

    prefix: str = ""
    suffix: str = ""

    def render(self, prompt: str) -> str:
        return f"{self.prefix}{prompt}{self.suffix}"


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    completion: list[int]
    """Completion tokens, EOS last."""


def encode_examples(rows: Sequence[dict], tokenizer: CharTokenizer, template: Template = Template()) -> list[Example]:
    missing = [i for i, row in enumerate(rows) if "prompt" not in row or "completion" not in row]
    if missing:
        raise ValueError(f"rows {missing[:5]} lack 'prompt' or 'completion': SFT rows need both")
    return [Example(tokenizer.encode(template.render(row["prompt"])),
                    tokenizer.encode(row["completion"]) + [tokenizer.eos_id]) for row in rows]


@dataclass
class TokenBatch:
    inputs: torch.Tensor
    """(B, L) input ids."""
    targets: torch.Tensor
    """(B, L) next-token targets, IGNORE_INDEX off the completions."""
    positions: Optional[torch.Tensor] = None
    """(B, L) RoPE positions (packed rows only; else 0..L-1)."""
    doc_ids: Optional[torch.Tensor] = None
    """(B, L) document of each position (packed rows only)."""

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def _sequence_arrays(example: Example) -> tuple[list[int], list[int]]:
    """Inputs and targets of one example: inputs prompt + completion[:-1], targets shifted by one,
    ignored on the prompt."""
    tokens = example.prompt + example.completion
    targets = [IGNORE_INDEX] * (len(example.prompt) - 1) + example.completion
    return tokens[:-1], targets


def padded_batch(examples: Sequence[Example], pad_id: int) -> TokenBatch:
    """One example per row, right-padded."""
    arrays = [_sequence_arrays(e) for e in examples]
    length = max(len(inputs) for inputs, _ in arrays)
    inputs = torch.full((len(arrays), length), pad_id, dtype=torch.long)
    targets = torch.full((len(arrays), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(arrays):
        inputs[row, :len(x)] = torch.tensor(x)
        targets[row, :len(y)] = torch.tensor(y)
    return TokenBatch(inputs, targets)


def packed_batch(examples: Sequence[Example], seq_len: int, pad_id: int) -> TokenBatch:
    """Examples packed first-fit (longest first) into rows of seq_len positions; each keeps its own
    positions from 0 and a document id (padding gets its own document)."""
    arrays = sorted((_sequence_arrays(e) for e in examples), key=lambda a: -len(a[0]))
    too_long = [len(x) for x, _ in arrays if len(x) > seq_len]
    if too_long:
        raise ValueError(f"an example of {too_long[0]} tokens does not fit a packed row of seq_len "
                         f"({seq_len}): raise sft.seq_len")
    rows: list[list[tuple[list[int], list[int]]]] = []
    fill: list[int] = []
    for inputs, targets in arrays:
        slot = next((r for r, used in enumerate(fill) if used + len(inputs) <= seq_len), None)
        if slot is None:
            rows.append([])
            fill.append(0)
            slot = len(rows) - 1
        rows[slot].append((inputs, targets))
        fill[slot] += len(inputs)
    shape = (len(rows), seq_len)
    batch = TokenBatch(torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE_INDEX, dtype=torch.long),
                       torch.zeros(shape, dtype=torch.long), torch.full(shape, -1, dtype=torch.long))
    for row, documents in enumerate(rows):
        start = 0
        for doc, (inputs, targets) in enumerate(documents):
            end = start + len(inputs)
            batch.inputs[row, start:end] = torch.tensor(inputs)
            batch.targets[row, start:end] = torch.tensor(targets)
            batch.positions[row, start:end] = torch.arange(len(inputs))
            batch.doc_ids[row, start:end] = doc
            start = end
    return batch
