"""Routing replay for MoE policies: train on the experts the rollout used.

A token's top-k experts can flip between the rollout (incremental decoding, one policy version)
and the training forward (full sequence, later versions after inner updates); the importance
ratio then compares two different sub-networks. Replay records each router's choices while
sampling and forces them in the training forward (the gates still come from the current
affinities, so the router keeps learning). It needs one hook in the model: ``Router.forced_indices``.

1. ``record_routing(model)`` collects, per router, the (B, T, K) choices of every forward call
   (the prefill, then one call per decoded token);
2. ``rollout_routing`` turns them into one (L_i - 1, K) tensor per sequence, in the order the
   training forward sees its inputs (prompt from position 0, then the completion without its
   last token);
3. ``replay_routing(model, batch_routing(...))`` forces them for one padded training batch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from dsv3_train.model.moe import Router, routers

RoutingChoices = dict[str, torch.Tensor]  # router name -> (positions, K) expert indices


class RoutingRecord:
    """Per router, the (B, T, K) expert choices of each forward call, in call order."""

    def __init__(self):
        self.calls: dict[str, list[torch.Tensor]] = {}

    def hook(self, name: str):
        def save(router: Router, args, routing) -> None:
            batch, length = args[0].shape[:2]
            self.calls.setdefault(name, []).append(routing.indices.view(batch, length, -1).clone())
        return save

    def stacked(self) -> dict[str, torch.Tensor]:
        """Router name -> (B, slots, K): every call concatenated along the cache slots."""
        return {name: torch.cat(calls, dim=1) for name, calls in self.calls.items()}


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    record = RoutingRecord()
    handles = [router.register_forward_hook(record.hook(name)) for name, router in routers(model)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def rollout_routing(record: RoutingRecord, prompt_lengths: Sequence[int], completion_lengths: Sequence[int]
                    ) -> list[RoutingChoices]:
    """Per sequence, router name -> (prompt + completion - 1, K) choices in training order.

    Decoding left-pads the prompts to P slots, so sequence b's prompt sits at slots [P - p_b, P)
    and the token fed at decode step j (its j-th completion token) at slot P + j."""
    padded = max(prompt_lengths)
    stacked = {name: choices.clone() for name, choices in record.stacked().items()}  # leave inference mode
    per_sequence = []
    for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        per_sequence.append({name: torch.cat([choices[row, padded - p:padded], choices[row, padded:padded + c - 1]])
                             for name, choices in stacked.items()})
    return per_sequence


def batch_routing(sequences: Sequence[RoutingChoices], length: int) -> RoutingChoices:
    """Per router (B * length, K) choices for a right-padded batch of inputs of the given length;
    padding positions get experts 0..K-1 (their outputs are never scored)."""
    names = sequences[0].keys()
    batch = {}
    for name in names:
        top_k = sequences[0][name].shape[-1]
        rows = []
        for choices in sequences:
            filler = torch.arange(top_k).expand(length - choices[name].shape[0], top_k)
            rows.append(torch.cat([choices[name], filler]))
        batch[name] = torch.stack(rows).flatten(0, 1)
    return batch


@contextlib.contextmanager
def replay_routing(model: nn.Module, choices: Optional[RoutingChoices]):
    """Force the given (N, K) choices on each router for the forwards inside (no-op for None)."""
    if choices is None:
        yield
        return
    named = dict(routers(model))
    missing = set(named) - set(choices)
    if missing:
        raise ValueError(f"routing replay has no choices for routers {sorted(missing)}: record them at rollout")
    try:
        for name, router in named.items():
            router.forced_indices = choices[name]
        yield
    finally:
        for router in named.values():
            router.forced_indices = None
