"""What post-training needs from the model: forwards over packed or padded rows, token
log-probabilities, and policy checkpoints (model + tokenizer in one directory).

Packed rows hold several documents; each document must see only itself and start at RoPE
position 0, as it will at inference. ``packed_forward`` therefore runs the blocks with per-token
positions and a block-diagonal causal mask, reusing the decoder's per-position projection
(``generate.project_at_positions``) and the expanded-K/V attention. With one document per row it
equals ``model(ids)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from dsv3_train.config import ModelConfig
from dsv3_train.generate import expanded_attention, project_at_positions
from dsv3_train.model import Transformer, update_expert_biases
from dsv3_train.model.transformer import IGNORE_INDEX
from dsv3_train.posttrain.tokenizer import CharTokenizer

TOKENIZER_FILE = "tokenizer.json"


def forward_logits(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T), one sequence per row from position 0 (right padding is harmless: causal)
    -> (logits (B, T, V), balance loss)."""
    hidden, balance = model.forward_hidden(ids)
    return model.head(model.norm(hidden)), balance


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> (B, T, T): query t sees keys s <= t of its own document."""
    length = doc_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


def packed_forward(model: Transformer, ids: torch.Tensor, positions: torch.Tensor,
                   doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, positions, doc_ids (B, T) -> (logits (B, T, V), balance loss); documents do not see
    each other and each counts its RoPE positions from its own start."""
    mask = document_causal_mask(doc_ids)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (B, T, R/2)
    h = model.embed(ids)
    balance = h.new_zeros((), dtype=torch.float32)
    for block in model.layers:
        attn = block.attn
        q_nope, q_rope, c_kv, k_rope = project_at_positions(attn, block.attn_norm(h), cos, sin)
        k_nope, values = attn.expand_kv(c_kv)  # (B, T, H, nope), (B, T, H, v)
        keys = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, attn.n_heads, -1)], dim=-1)
        h, block_balance = block.feed_forward(h + expanded_attention(attn, q_nope, q_rope, keys, values, mask))
        balance = balance + block_balance
    return model.head(model.norm(h)), balance


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position in fp32: logits (B, T, V), targets (B, T) -> (B, T); 0 where the
    target is IGNORE_INDEX."""
    safe = targets.clamp(min=0)
    logprobs = -F.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none")  # (B, T)
    return logprobs.masked_fill(targets == IGNORE_INDEX, 0.0)


def save_policy(model: Transformer, tokenizer: CharTokenizer, out_dir) -> Path:
    """A DCP model checkpoint (loadable by dsv3-generate --prompt-ids) plus the tokenizer."""
    from dsv3_train.convert import save_dcp_model

    out_dir = save_dcp_model(model, out_dir)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    return out_dir


def load_policy(path) -> tuple[Transformer, CharTokenizer]:
    from dsv3_train.convert import load_dcp_model

    path = Path(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {TOKENIZER_FILE}: pass a directory written by dsv3-posttrain")
    return load_dcp_model(path).train(), CharTokenizer.load(path / TOKENIZER_FILE)


def count_parameters(model: Transformer) -> tuple[int, int]:
    """(total, activated per token) parameter counts; activated counts top-k routed experts only."""
    cfg: ModelConfig = model.cfg
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    active_share = cfg.n_activated_experts / cfg.n_routed_experts
    return total, int(total - routed + routed * active_share)


def expert_load_imbalance(policy: Transformer, speed: float, runtime) -> Optional[float]:
    """Mean over routers of max/mean expert load in this step's training forwards (all ranks);
    moves the balancing biases by ``speed`` (0 = frozen) and resets the counts."""
    loads = update_expert_biases(policy, speed, runtime.sum_tensor_)
    ratios = [float(load.max() / load.mean()) for load in loads.values() if load.sum() > 0]
    return sum(ratios) / len(ratios) if ratios else None
