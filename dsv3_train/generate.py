"""Decoding with the compressed-latent KV cache; sampling; MTP speculative decoding.

MLA caches, per layer and token, only the normalised latent c_KV (kv_lora_rank values) and the
roped key shared by all heads (qk_rope_head_dim values). Decoding attends in latent space with
the up-projection W_UKV = [W_UK; W_UV] absorbed (DeepSeek-V2 section 2.1.3):

    score_{h,t,s} = scale * ((W_UK_h^T q_nope_{h,t}) . c_s + q_rope_{h,t} . k_rope_s)
    out_{h,t}     = W_UV_h (sum_s softmax_s(score_{h,t,s}) c_s)

so per-head keys and values are never formed. ``absorb=False`` keeps the naive alternative (a
cache of expanded per-head K and V) for comparison. Prompts of different lengths are left-padded;
every row carries its own RoPE positions and a key mask hides the padding, so a row decodes the
same tokens batched or alone.

Speculative decoding drafts one token with the first MTP module (from the main model's last
hidden state and the embedding of the token just accepted) and verifies it with one two-token
forward of the main model; a rejected draft is rolled back by truncating the cache.

    dsv3-generate runs/toy --prompt "def main(" --max-new-tokens 64 [--speculative]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_train.model import Transformer
from dsv3_train.model.attention import MultiHeadLatentAttention

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer


# ----------------------------------------------------------------------------- KV caches
def project_at_positions(attn: MultiHeadLatentAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x (B, T, D) with per-row rope tables cos/sin (B, T, R/2) ->
    q_nope (B, T, H, nope), roped q_rope (B, T, H, R), c_KV (B, T, kv_lora_rank), roped k_rope (B, T, R)."""
    batch, length = x.shape[:2]
    # Seen as one row of B*T tokens, every token brings its own cos/sin: rows may be at any position.
    flat = x.reshape(1, batch * length, -1)
    cos, sin = cos.reshape(batch * length, -1), sin.reshape(batch * length, -1)
    projected = (*attn.project_query(flat, cos, sin), *attn.compress_kv(flat, cos, sin))
    return tuple(t.reshape(batch, length, *t.shape[2:]) for t in projected)


def absorbed_attention(attn: MultiHeadLatentAttention, q_nope, q_rope, latent, rope_key,
                       mask) -> torch.Tensor:
    """Attention in latent space: W_UK folded into the query, W_UV applied to the latent output.

    q_nope (B, T, H, nope), q_rope (B, T, H, R), latent c_KV (B, S, r), rope_key (B, S, R),
    mask (B, T, S) True where a query may attend -> attention output after wo (B, T, D).
    """
    w_ukv = attn.wkv_b.weight.view(attn.n_heads, attn.nope_dim + attn.v_dim, attn.kv_lora_rank)
    w_uk, w_uv = w_ukv.split([attn.nope_dim, attn.v_dim], dim=1)  # (H, nope, r), (H, v, r)
    q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
    scores = (torch.einsum("bhtr,bsr->bhts", q_latent, latent)
              + torch.einsum("bthp,bsp->bhts", q_rope, rope_key)) * attn.softmax_scale  # (B, H, T, S)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(latent.dtype)
    out_latent = torch.einsum("bhts,bsr->bthr", probs, latent)  # (B, T, H, r)
    out = torch.einsum("bthr,hvr->bthv", out_latent, w_uv)  # (B, T, H, v)
    return attn.wo(out.flatten(2))


def expanded_attention(attn: MultiHeadLatentAttention, q_nope, q_rope, keys, values, mask) -> torch.Tensor:
    """Plain multi-head attention over expanded keys (B, S, H, nope + R) and values (B, S, H, v)."""
    query = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, nope + R)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=attn.softmax_scale)  # (B, H, T, v)
    return attn.wo(out.transpose(1, 2).flatten(2))


class LatentKVCache:
    """Per layer only c_KV (B, capacity, kv_lora_rank) and the roped shared key (B, capacity, R)."""

    def __init__(self, n_layers: int, batch: int, capacity: int, cfg, dtype, device):
        def empty(width):
            return [torch.zeros(batch, capacity, width, dtype=dtype, device=device) for _ in range(n_layers)]

        self.latent, self.rope_key = empty(cfg.kv_lora_rank), empty(cfg.qk_rope_head_dim)

    def tensors(self) -> list[torch.Tensor]:
        return self.latent + self.rope_key

    def attend(self, layer: int, attn, x, cos, sin, start: int, mask) -> torch.Tensor:
        """Append the latents of x (B, T, D) at start.. and attend with absorption -> (B, T, D)."""
        q_nope, q_rope, c_kv, k_rope = project_at_positions(attn, x, cos, sin)
        end = start + x.shape[1]
        self.latent[layer][:, start:end] = c_kv
        self.rope_key[layer][:, start:end] = k_rope
        return absorbed_attention(attn, q_nope, q_rope, self.latent[layer][:, :end],
                                  self.rope_key[layer][:, :end], mask)


class ExpandedKVCache:
    """The naive cache: per layer expanded keys (B, capacity, H, nope + R) and values (B, capacity, H, v)."""

    def __init__(self, n_layers: int, batch: int, capacity: int, cfg, dtype, device):
        def empty(width):
            return [torch.zeros(batch, capacity, cfg.n_heads, width, dtype=dtype, device=device)
                    for _ in range(n_layers)]

        self.keys, self.values = empty(cfg.qk_head_dim), empty(cfg.v_head_dim)

    def tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values

    def attend(self, layer: int, attn, x, cos, sin, start: int, mask) -> torch.Tensor:
        """Append the expanded keys/values of x (B, T, D) at start.. and attend -> (B, T, D)."""
        q_nope, q_rope, c_kv, k_rope = project_at_positions(attn, x, cos, sin)
        k_nope, v = attn.expand_kv(c_kv)  # (B, T, H, nope), (B, T, H, v)
        end = start + x.shape[1]
        self.keys[layer][:, start:end] = torch.cat(
            [k_nope, k_rope.unsqueeze(2).expand(-1, -1, attn.n_heads, -1)], dim=-1)
        self.values[layer][:, start:end] = v
        return expanded_attention(attn, q_nope, q_rope, self.keys[layer][:, :end],
                                  self.values[layer][:, :end], mask)


def cache_bytes_per_token(cache) -> int:
    """Bytes one token of one sequence occupies in the cache, summed over its layers."""
    return sum(t[0, 0].nbytes for t in cache.tensors())


# ----------------------------------------------------------------------------- incremental forward
def attention_mask(key_valid: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Queries at cache slots start..start+length-1 see valid keys at or before their slot, and
    always themselves (so a padding query never has an empty softmax): (B, S) -> (B, T, S)."""
    total = start + length
    keys = torch.arange(total, device=key_valid.device)
    queries = torch.arange(start, total, device=key_valid.device)[:, None]  # (T, 1)
    return (key_valid[:, None, :total] & (keys <= queries)) | (keys == queries)


class CachedStack:
    """Transformer blocks run incrementally: each call appends T slots to the cache."""

    def __init__(self, blocks: Sequence[nn.Module], model: Transformer, batch: int, capacity: int,
                 absorb: bool = True):
        param = model.embed.weight
        kind = LatentKVCache if absorb else ExpandedKVCache
        self.blocks, self.rope_cos, self.rope_sin = blocks, model.rope_cos, model.rope_sin
        self.cache = kind(len(blocks), batch, capacity, model.cfg, param.dtype, param.device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=param.device)
        self.length = 0

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) at RoPE positions (B, T); valid (B, T) False for padding -> (B, T, D)."""
        start, end = self.length, self.length + h.shape[1]
        if end > self.key_valid.shape[1]:
            raise ValueError(f"cache capacity ({self.key_valid.shape[1]}) is too small for {end} slots: "
                             f"allocate at least {end}")
        self.key_valid[:, start:end] = valid
        mask = attention_mask(self.key_valid, start, end - start)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, R/2)
        for layer, block in enumerate(self.blocks):
            attended = self.cache.attend(layer, block.attn, block.attn_norm(h), cos, sin, start, mask)
            h, _ = block.feed_forward(h + attended)
        self.length = end
        return h


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ids (B, P) padded on the left with 0, valid (B, P) False on the padding."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return ids, valid


class Decoder:
    """A Transformer decoding a batch incrementally: prefill the prompts, then extend every row."""

    def __init__(self, model: Transformer, batch: int, capacity: int, absorb: bool = True):
        self.model = model
        self.stack = CachedStack(model.layers, model, batch, capacity, absorb)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=model.embed.weight.device)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Left-padded prompts -> hidden states (B, P, D) before the final norm."""
        ids, valid = left_pad(prompts, self.next_position.device)
        positions = (valid.cumsum(1) - 1).clamp(min=0)  # each row counts from its first token
        self.next_position = valid.sum(1)
        return self.stack(self.model.embed(ids), positions, valid)

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) following each row's last token -> hidden states (B, T, D)."""
        positions = self.next_position[:, None] + torch.arange(ids.shape[1], device=ids.device)
        self.next_position = self.next_position + ids.shape[1]
        return self.stack(self.model.embed(ids), positions, torch.ones_like(ids, dtype=torch.bool))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.norm(hidden))

    def truncate(self, length: int) -> None:
        """Forget the newest slots beyond length (a rejected draft)."""
        self.next_position = self.next_position - (self.stack.length - length)
        self.stack.length = length


class MTPDrafter:
    """The first MTP module over its own latent cache: at position i it merges h_i with
    Emb(t_{i+1}) and predicts t_{i+2} (V3 eqs. 21-23); batch of one sequence."""

    def __init__(self, model: Transformer, capacity: int):
        self.model, self.module = model, model.mtp[0]
        self.stack = CachedStack([self.module.block], model, 1, capacity)

    def __call__(self, hidden: torch.Tensor, next_tokens: list[int]) -> int:
        """Main hidden states (1, T, D) of the next T positions and the tokens that follow each
        -> the greedy draft of the token after the last of them."""
        ids = torch.tensor([next_tokens], device=hidden.device)
        positions = self.stack.length + torch.arange(len(next_tokens), device=hidden.device)[None]
        h = self.stack(self.module.merge(hidden, self.model.embed(ids)), positions,
                       torch.ones_like(ids, dtype=torch.bool))
        return int(self.model.head(self.module.norm(h[:, -1])).argmax(-1))


# ----------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """ValueError naming the bad argument and its valid range."""
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0: 0 is greedy")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k ({top_k}) must be >= 1, or None to keep every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1], or None to keep every token")


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Set to -inf all but the top_k largest logits (ties with the k-th kept), then all but the
    smallest set of most likely tokens whose probability reaches top_p (nucleus): (B, V) -> (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # the first token's is 0 < top_p: kept
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) restricted by top_k, then top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- generation
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (routers count no load, nothing trains) for the duration, then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_lengths(model: Transformer, prompts, max_new_tokens: int) -> int:
    """The cache capacity the longest prompt needs; ValueError for bad lengths."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    capacity = max(len(p) for p in prompts) + max_new_tokens
    if capacity > model.cfg.max_seq_len:
        raise ValueError(f"longest prompt ({capacity - max_new_tokens}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds model.max_seq_len ({model.cfg.max_seq_len}): "
                         f"shorten the prompt or ask for fewer tokens")
    return capacity


def _until_stop(tokens: list[int], stop_tokens: Iterable[int], max_new_tokens: int) -> list[int]:
    """tokens cut before the first stop token and to max_new_tokens."""
    stops = set(stop_tokens)
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:min(index, max_new_tokens)]
    return tokens[:max_new_tokens]


@dataclass
class Samples:
    """What :func:`sample` drew for each row of a batch."""

    tokens: list[list[int]]
    """New tokens of each row; the stop token that ended a row is kept as its last token."""
    logprobs: list[list[float]]
    """log pi(token | prefix) of each new token under the model's untempered, unfiltered
    distribution (what post-training calls the behaviour log-probabilities)."""
    stopped: list[bool]
    """Whether a stop token ended the row (else it ran to max_new_tokens)."""


@torch.inference_mode()
def sample(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, stop_tokens: Iterable[int] = (),
           generator: Optional[torch.Generator] = None, absorb: bool = True) -> Samples:
    """Continue each prompt by up to max_new_tokens tokens, batched, keeping each token's log-prob
    and the stop token that ends a row. Greedy when temperature is 0."""
    check_sampling(temperature, top_k, top_p)
    capacity = _check_lengths(model, prompts, max_new_tokens)
    stops = set(stop_tokens)
    drawn = Samples([[] for _ in prompts], [[] for _ in prompts], [False] * len(prompts))
    with _eval_mode(model):
        decoder = Decoder(model, len(prompts), capacity, absorb)
        logits = decoder.logits(decoder.prefill(prompts)[:, -1])  # (B, V)
        for step in range(max_new_tokens):
            tokens = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            logprobs = logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)  # (B,)
            for row, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
                if not drawn.stopped[row]:
                    drawn.tokens[row].append(token)
                    drawn.logprobs[row].append(logprob)
                    drawn.stopped[row] = token in stops
            if all(drawn.stopped) or step == max_new_tokens - 1:
                break
            logits = decoder.logits(decoder.extend(tokens[:, None])[:, -1])
    return drawn


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, stop_tokens: Iterable[int] = (),
             generator: Optional[torch.Generator] = None, absorb: bool = True) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens, batched; returns the new tokens of each
    (a stop token ends its sequence and is not returned). Greedy when temperature is 0.
    ``absorb=False`` decodes with the naive expanded per-head K/V cache instead."""
    drawn = sample(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator, absorb)
    return [tokens[:-1] if stopped else tokens for tokens, stopped in zip(drawn.tokens, drawn.stopped)]


@dataclass
class SpeculativeStats:
    """Counts of one speculative run: each verification forward checks one draft."""

    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                         stop_tokens: Iterable[int] = (), absorb: bool = True
                         ) -> tuple[list[list[int]], SpeculativeStats]:
    """Greedy decoding with MTP drafts: the same tokens as ``generate(temperature=0)``, plus the
    draft statistics. Prompts are decoded one at a time; with mtp_depth > 1 only the first MTP
    module drafts (one token per verification)."""
    if not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP module but the model has mtp_depth=0: "
                         "use a model trained with model.mtp_depth >= 1, or decode without it")
    stats = SpeculativeStats()
    with _eval_mode(model):
        outputs = [_speculate_one(model, prompt, max_new_tokens, stop_tokens, stats, absorb)
                   for prompt in prompts]
    return outputs, stats


def _speculate_one(model: Transformer, prompt: list[int], max_new_tokens: int, stop_tokens,
                   stats: SpeculativeStats, absorb: bool) -> list[int]:
    """One prompt: 1. prefill and take the greedy token; 2. MTP drafts the next one; 3. the main
    model runs [last token, draft] in one forward; 4. keep the draft when it equals the greedy token
    at the first slot (then the second slot's greedy token is also exact), else truncate the draft's
    slot; 5. feed the accepted slots to the MTP cache and repeat."""
    capacity = _check_lengths(model, [prompt], max_new_tokens)
    stops = set(stop_tokens)
    main, drafter = Decoder(model, 1, capacity, absorb), MTPDrafter(model, capacity)
    hidden = main.prefill([prompt])  # (1, n, D)
    tokens = [int(main.logits(hidden[:, -1]).argmax(-1))]
    following = list(prompt[1:]) + tokens  # the token after each position of hidden
    while len(tokens) < max_new_tokens and not stops.intersection(tokens):
        draft = drafter(hidden, following)
        hidden = main.extend(torch.tensor([[tokens[-1], draft]], device=hidden.device))  # (1, 2, D)
        verified = main.logits(hidden)[0].argmax(-1).tolist()
        stats.drafted += 1
        if verified[0] == draft:
            stats.accepted += 1
            following = [draft, verified[1]]
        else:
            main.truncate(main.stack.length - 1)
            hidden, following = hidden[:, :1], verified[:1]
        tokens += following
    return _until_stop(tokens, stops, max_new_tokens)


# ----------------------------------------------------------------------------- command line
def _run_tokenizer(run_dir: Path, vocab_size: int):
    """The tokenizer a run trained with: data.tokenizer, else its token cache entry (rebuilt when
    missing; cache_dir is relative to the working directory, as in training)."""
    from omegaconf import OmegaConf

    from dsv3_train.config import DataConfig
    from dsv3_train.data import build_dataset, load_tokenizer

    data = OmegaConf.load(str(run_dir / ".hydra" / "config.yaml")).data
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data))
    if data_cfg.tokenizer is not None:
        return load_tokenizer(data_cfg.tokenizer)
    return build_dataset(data_cfg, vocab_size, progress=False).tokenizer


@dataclass
class GenerationSetup:
    """What the command line needs: the model and how to talk to it."""

    model: Transformer
    tokenizer: Optional["Tokenizer"]
    stop_tokens: list[int]
    prompt_prefix: list[int]
    """Tokens a training document starts after: <|endoftext|> for our runs, BOS for HF models."""


def _hf_setup(path: Path, tokenizer: Optional[str], mtp_depth: Optional[int]) -> GenerationSetup:
    """An HF DeepseekV3 directory; its tokenizer.json and eos/bos ids when present."""
    import json

    from tokenizers import Tokenizer

    from dsv3_train.hf import load_hf_checkpoint

    model = load_hf_checkpoint(path, mtp_depth=mtp_depth)
    tok_file = Path(tokenizer) if tokenizer else path / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
    config = json.loads((path / "config.json").read_text())
    eos, bos = config.get("eos_token_id"), config.get("bos_token_id")
    stops = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return GenerationSetup(model, tok, stops, [] if bos is None else [bos])


def load_for_generation(path, tokenizer: Optional[str] = None,
                        mtp_depth: Optional[int] = None) -> GenerationSetup:
    """Model (eval mode) and tokenizer from a run directory (its latest checkpoint), a checkpoint
    directory (``step_*`` or a ``convert --from-hf`` output) or a Hugging Face DeepseekV3 directory."""
    from dsv3_train.checkpoint import latest_checkpoint
    from dsv3_train.convert import load_dcp_model
    from dsv3_train.data.tokenizer import EOS_TOKEN, load_tokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return _hf_setup(path, tokenizer, mtp_depth)
    run_dir = path if (path / ".hydra").is_dir() else path.parent.parent
    ckpt = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else path
    if ckpt is None:
        raise FileNotFoundError(f"{path / 'checkpoints'} holds no complete checkpoint yet")
    model = load_dcp_model(ckpt)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif (run_dir / ".hydra" / "config.yaml").is_file():
        tok = _run_tokenizer(run_dir, model.cfg.vocab_size)
    else:
        tok = None
    eos = [] if tok is None or tok.token_to_id(EOS_TOKEN) is None else [tok.token_to_id(EOS_TOKEN)]
    return GenerationSetup(model, tok, eos, eos)


def _prompt_ids(args, setup: GenerationSetup) -> list[int]:
    if args.prompt_ids is not None:
        return [int(t) for t in args.prompt_ids.replace(",", " ").split()]
    if setup.tokenizer is None:
        raise ValueError(f"no tokenizer found for {args.checkpoint}: pass --tokenizer tokenizer.json "
                         f"or give token ids with --prompt-ids")
    return setup.prompt_prefix + setup.tokenizer.encode(args.prompt).ids


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="dsv3-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir, checkpoint dir (step_* or convert output) or HF dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (encoded with the run's tokenizer)")
    source.add_argument("--prompt-ids", help="prompt token ids, comma or space separated")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch's default; 1 is fastest for toy models)")
    parser.add_argument("--speculative", action="store_true",
                        help="greedy MTP speculative decoding; prints the acceptance rate")
    parser.add_argument("--tokenizer", help="tokenizer.json to use instead of the run's")
    parser.add_argument("--mtp-depth", type=int, default=None,
                        help="HF dir: MTP layers to load (0 for transformers save_pretrained output)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.speculative and (args.temperature > 0 or args.top_k or args.top_p):
            raise ValueError("--speculative decodes greedily: drop --temperature/--top-k/--top-p, "
                             "or drop --speculative to sample")
        setup = load_for_generation(args.checkpoint, args.tokenizer, args.mtp_depth)
        prompt, model, stop = _prompt_ids(args, setup), setup.model, setup.stop_tokens
        start = time.perf_counter()
        if args.speculative:
            (tokens,), stats = speculative_generate(model, [prompt], args.max_new_tokens, stop)
        else:
            (tokens,) = generate(model, [prompt], args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, stop, torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    tokenizer = setup.tokenizer
    print(tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens)))
    summary = f"[{len(tokens)} tokens in {seconds:.2f} s, {len(tokens) / seconds:.1f} tokens/s"
    if args.speculative:
        summary += f"; acceptance rate {stats.acceptance_rate:.1%} ({stats.accepted}/{stats.drafted} drafts)"
    print(summary + "]")


if __name__ == "__main__":
    main()
