"""The GRPO objective, term by term (DeepSeekMath eqs. 3-4; DAPO; Dr. GRPO).

For a prompt, G outputs o_i with rewards r_i. Per token t of o_i:

  A_i        = (r_i - mean(r)) / (std(r) + eps)      group-relative advantage (std scaling optional;
                                                     std is the sample std over the group, as TRL)
  rho_i,t    = exp(log pi_theta - log pi_old)       ratio to the behaviour policy of the rollout
  surrogate  = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
  k3_i,t     = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1     (>= 0)
  loss_i,t   = -(surrogate - beta * k3)

and the loss is sum_i,t w_i,t loss_i,t with the aggregation weights w of ``aggregation_weights``:

  seq-mean-token-mean   w = 1 / (N_seq |o_i|)       GRPO: mean over tokens, then over sequences
  token-mean            w = 1 / N_tok               DAPO: every token of the batch weighs the same
  seq-mean-token-sum-norm  w = 1 / (N_seq L_max)     Dr. GRPO: a constant normaliser (L_max = the
                                                     generation budget), no length bias

N_seq and N_tok count the *whole* batch, over every micro-batch and data-parallel rank, so summing
per-micro-batch losses (and gradients over ranks) gives exactly the full-batch loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

LOSS_AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): reward minus its group mean, divided by the group's
    sample std + eps when scale_std."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi_theta."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), clipped) per token; clipped is True where
    the clipped term is the smaller one (the token's gradient is zero there)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def aggregation_weights(mask: torch.Tensor, mode: str, n_sequences: float, n_tokens: float,
                        max_length: Optional[int] = None) -> torch.Tensor:
    """Weights w (B, T) of each completion token in the loss (see the module docstring); mask (B, T)
    marks completion tokens; n_sequences / n_tokens count the whole batch."""
    mask = mask.to(torch.float32)
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
        return mask / (lengths * n_sequences)
    if mode == "token-mean":
        return mask / max(n_tokens, 1.0)
    if mode == "seq-mean-token-sum-norm":
        if max_length is None:
            raise ValueError("seq-mean-token-sum-norm (Dr. GRPO) needs max_length: the generation budget")
        return mask / (n_sequences * max_length)
    raise ValueError(f"loss aggregation ({mode!r}) must be one of {LOSS_AGGREGATIONS}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, max_length: Optional[int] = None) -> torch.Tensor:
    """A whole batch's per-token values (B, T) reduced to a scalar with the given aggregation."""
    weights = aggregation_weights(mask, mode, mask.shape[0], float(mask.sum()), max_length)
    return (values * weights).sum()


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    """sum_i,t w_i,t loss_i,t: this micro-batch's share of the batch loss."""
    clipped_tokens: float
    kl_sum: float
    """Sum of k3(pi_theta || pi_ref) over the tokens (0 without a reference)."""
    ratio_sum: float
    behaviour_kl_sum: float
    """Sum of k3(pi_theta || pi_old): how far the inner updates moved from the rollout policy."""


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                weights: torch.Tensor, eps_low: float, eps_high: float, beta: float = 0.0,
                ref_logprobs: Optional[torch.Tensor] = None) -> PolicyLoss:
    """The GRPO loss of a micro-batch: per-token tensors (B, T), advantages (B,) or (B, T),
    aggregation weights (B, T) (zero off the completion tokens)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    surrogate, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high)
    per_token = -surrogate
    mask = weights > 0
    kl_sum = 0.0
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError(f"beta ({beta}) > 0 needs ref_logprobs from the frozen reference model")
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        kl_sum = float(kl.detach()[mask].sum())
    with torch.no_grad():
        ratio_sum = float(torch.exp(logprobs - old_logprobs)[mask].sum())
        behaviour_kl_sum = float(k3_kl(logprobs, old_logprobs)[mask].sum())
    return PolicyLoss((per_token * weights).sum(), float(clipped[mask].sum()), kl_sum, ratio_sum, behaviour_kl_sum)
