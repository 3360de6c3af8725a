"""Sampling completions from a policy with the latent-KV-cache decoder, and scoring them.

``sample_rollouts`` draws n completions per prompt (batched ``generate.sample``), keeping each
token's behaviour log-prob and, for routing replay, the experts every token was routed to.
``evaluate`` is greedy held-out accuracy and format rate.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dsv3_train.generate import sample
from dsv3_train.model import Transformer
from dsv3_train.posttrain.data import Template
from dsv3_train.posttrain.replicas import SingleProcess
from dsv3_train.posttrain.rewards import format_reward, resolve_reward
from dsv3_train.posttrain.routing import RoutingChoices, record_routing, rollout_routing
from dsv3_train.posttrain.tokenizer import CharTokenizer


@dataclass
class Rollout:
    row: dict
    """The problem: its prompt text and the columns its rewards read."""
    group: int
    """Index of the prompt within the step (samples of one prompt share it)."""
    prompt: list[int]
    completion: list[int]
    """Sampled tokens; the EOS that ended it included."""
    logprobs: list[float]
    """Behaviour log-probs of the completion tokens at rollout time."""
    text: str
    """The decoded completion (EOS dropped)."""
    routing: Optional[RoutingChoices] = None
    """Per router (prompt + completion - 1, K) experts used at rollout (routing replay)."""


def reward_columns(rows: Sequence[dict]) -> dict[str, list]:
    """The rows' columns other than prompt/completion, as lists (the rewards' keyword arguments)."""
    keys = [k for k in rows[0] if k not in ("prompt", "completion")] if rows else []
    return {key: [row.get(key) for row in rows] for key in keys}


def sample_rollouts(model: Transformer, rows: Sequence[dict], tokenizer: CharTokenizer, n_samples: int,
                    max_new_tokens: int, temperature: float = 1.0, top_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, record: bool = False,
                    batch_size: int = 512, template: Template = Template()) -> list[Rollout]:
    """n_samples completions of each row's prompt, grouped: rollouts[g * n_samples + j] is sample j
    of rows[g]. ``record`` keeps the routing of every token (MoE routing replay)."""
    jobs = [(group, row, tokenizer.encode(template.render(row["prompt"])))
            for group, row in enumerate(rows) for _ in range(n_samples)]
    rollouts = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        prompts = [ids for _, _, ids in chunk]
        with record_routing(model) if record else contextlib.nullcontext() as routing_record:
            drawn = sample(model, prompts, max_new_tokens, temperature, top_p=top_p,
                           stop_tokens=[tokenizer.eos_id], generator=generator)
        routing = (rollout_routing(routing_record, [len(p) for p in prompts], [len(t) for t in drawn.tokens])
                   if record and routing_record.calls else [None] * len(chunk))
        for (group, row, ids), tokens, logprobs, choices in zip(chunk, drawn.tokens, drawn.logprobs, routing):
            rollouts.append(Rollout(row, group, ids, tokens, logprobs, tokenizer.decode(tokens), choices))
    return rollouts


@torch.no_grad()
def evaluate(model: Transformer, rows: Sequence[dict], tokenizer: CharTokenizer, accuracy_reward: str,
             max_new_tokens: int, runtime=SingleProcess(), template: Template = Template()) -> dict:
    """Greedy held-out accuracy and format rate (this rank scores its slice; results are global)."""
    rows = runtime.shard(rows)
    rollouts = sample_rollouts(model, rows, tokenizer, 1, max_new_tokens, temperature=0.0, template=template)
    texts, prompts = [r.text for r in rollouts], [r.row["prompt"] for r in rollouts]
    columns = reward_columns(rows)
    correct = resolve_reward(accuracy_reward)(prompts, texts, **columns)
    formatted = format_reward(prompts, texts)
    n, n_correct, n_formatted = runtime.sum([len(rows), sum(c or 0 for c in correct), sum(formatted)])
    return {"accuracy": n_correct / n, "format": n_formatted / n}
