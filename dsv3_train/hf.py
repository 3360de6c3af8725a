"""Hugging Face DeepseekV3 checkpoints in and out.

``load_hf_checkpoint(dir)`` reads a ``transformers`` DeepseekV3 directory (``config.json`` plus one
or many ``*.safetensors``, with ``model.safetensors.index.json`` when sharded) into our
:class:`~dsv3_train.model.Transformer`; ``save_hf_checkpoint(model, dir)`` writes the inverse
(``config.json`` + ``model.safetensors``), loadable by ``DeepseekV3ForCausalLM.from_pretrained``.

Strict both ways: every config field is mapped, checked against what our model computes, or listed
in ``IGNORED_FIELDS`` (no effect on the weights or the forward pass); anything else raises a
``ValueError`` naming the field, its value and what is supported. Every checkpoint tensor must be
consumed and every model tensor filled.

Layout facts (transformers 5.x, checked against the installed ``modeling_deepseek_v3``):

- Routed experts are fused in memory (``mlp.experts.gate_up_proj`` (E, 2H, D) = [gate; up],
  ``mlp.experts.down_proj`` (E, D, H)), but ``save_pretrained`` writes (and the Hub holds) one
  tensor per expert: ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``. Both load here; we
  write the per-expert form.
- ``DeepseekV3ForCausalLM`` builds no MTP module: it ignores the layer ``num_hidden_layers``
  tensors on load and never writes them. DeepSeek's checkpoints store MTP module k as layer
  ``num_hidden_layers + k``: ``enorm, hnorm, eh_proj``, a full block, ``shared_head.norm`` and
  copies of the embedding (``embed_tokens``) and head (``shared_head.head``).
- RoPE: ``rope_interleave=True`` (the default, DeepSeek's own weights) rotates interleaved pairs
  exactly as our model does, so q/k weights map unchanged. ``rope_interleave=False`` rotates
  (x_i, x_{i+R/2}); we permute the rope rows of ``q_proj``/``q_b_proj`` and
  ``kv_a_proj_with_mqa`` on load ([0, R/2, 1, R/2+1, ...]) so our interleaved rotation computes
  the same attention scores; ``save_hf_checkpoint(..., rope_interleave=False)`` undoes it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model import Transformer

HF_MODEL_TYPE = "deepseek_v3"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# transformers' DeepseekV3 normalises the q_a / kv_a latents with a hard-coded eps of 1e-6.
HF_LATENT_NORM_EPS = 1e-6

# Defaults of transformers' DeepseekV3Config (5.x), used for fields absent from config.json, so a
# missing field means here what it means to transformers.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": None, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_interleave": True,
    "attention_bias": False, "attention_dropout": 0.0, "rope_theta": 10000.0,
}

# Fields with no effect on the weights or the forward pass of a causal LM: accepted and dropped.
IGNORED_FIELDS = frozenset({
    # bookkeeping
    "architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
    # tokenizer / generation / runtime switches
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "output_router_logits", "output_attentions", "output_hidden_states", "return_dict",
    "use_return_dict", "torchscript", "use_bfloat16", "tokenizer_class", "prefix",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
    # heads / tasks other than causal LM, generic PretrainedConfig leftovers
    "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "chunk_size_feed_forward", "tf_legacy_loss", "pruned_heads",
    # unused by DeepseekV3 modeling: tensor-parallel / expert-parallel layout hints
    "pretraining_tp", "ep_size",
})


class HFFormatError(ValueError):
    """A Hugging Face config or checkpoint cannot be mapped exactly onto our model."""


@dataclass
class HFLayout:
    """What a HF checkpoint says beyond our ModelConfig."""

    rope_interleave: bool
    """True: rope dims stored interleaved (DeepSeek); False: half-split, permuted on load."""
    mtp_layers: Optional[int]
    """num_nextn_predict_layers as declared (None when config.json does not say)."""


# ----------------------------------------------------------------------------------- config
def _yarn_mscale(scale: float, coeff: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * coeff * math.log(scale) + 1.0


def _hf_attention_factor(params: dict, factor: float) -> float:
    """The cos/sin scale transformers' YaRN derives from rope parameters (``_compute_yarn_parameters``)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor, 1.0)


def _unsupported(field: str, value: Any, supported: str) -> HFFormatError:
    return HFFormatError(f"HF config field {field}={value!r} is not supported: {supported}")


_HF_DEFAULT = object()  # "use transformers' default for an absent field"


class _Fields:
    """config.json fields, each taken at most once; the rest must be ignorable."""

    def __init__(self, raw: dict):
        self.raw, self.taken = raw, set()

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, default: Any = _HF_DEFAULT) -> Any:
        self.taken.add(name)
        if name in self.raw:
            return self.raw[name]
        return HF_DEFAULTS.get(name) if default is _HF_DEFAULT else default

    def require(self, name: str, allowed: tuple, supported: str, default: Any = _HF_DEFAULT) -> Any:
        value = self.get(name, default)
        if value not in allowed:
            raise _unsupported(name, value, supported)
        return value

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.raw if k not in self.taken and k not in IGNORED_FIELDS)


def _rope_from_hf(f: _Fields, max_pos: int) -> dict:
    """ModelConfig rope/YaRN kwargs equal to transformers' reading of rope_scaling/rope_parameters."""
    legacy, modern = f.get("rope_scaling", None), f.get("rope_parameters", None)
    top_theta = f.get("rope_theta")
    top_partial = f.get("partial_rotary_factor", None)
    top_original = f.get("original_max_position_embeddings", None)
    params = dict(legacy or modern or {})  # transformers gives rope_scaling priority
    if params and all(isinstance(v, dict) for v in params.values()):
        raise _unsupported("rope_parameters", params, "one global rope dict (not per layer type)")
    params.setdefault("rope_theta", top_theta)
    if top_partial is not None:
        params.setdefault("partial_rotary_factor", top_partial)
    rope_type = params.get("rope_type", params.get("type", "default"))
    known = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
             "partial_rotary_factor"}
    for key in params:
        if key not in known:
            raise _unsupported(f"rope_parameters.{key}", params[key],
                               f"known keys are {sorted(known)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                           "only 1.0 (all qk_rope_head_dim dims rotate)")
    out: dict[str, Any] = {"rope_theta": float(params["rope_theta"])}
    if rope_type == "default":
        return out
    if rope_type != "yarn":
        raise _unsupported("rope_parameters.rope_type", rope_type, "'default' or 'yarn'")
    if params.get("truncate", True) is not True:
        raise _unsupported("rope_parameters.truncate", params["truncate"],
                           "true (floor/ceil of the YaRN correction range, DeepSeek's choice)")
    original = top_original or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original
    factor = float(factor)
    if factor < 1.0:
        raise _unsupported("rope_parameters.factor", factor, "a YaRN factor >= 1")
    mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)  # falsy: no softmax scaling
    attention = _hf_attention_factor(params, factor)
    if factor == 1.0:
        if abs(attention - 1.0) > 1e-12:
            raise _unsupported("rope_parameters.attention_factor", attention,
                               "1.0 when the YaRN factor is 1")
        return out  # YaRN with factor 1 is plain RoPE
    # Our cos/sin scale is mscale(s, m) / mscale(s, mscale_all_dim): pick m to equal `attention`.
    given = params.get("mscale")
    if given is not None and abs(_yarn_mscale(factor, given) / _yarn_mscale(factor, mscale_all_dim)
                                 - attention) < 1e-12:
        mscale = float(given)
    elif not mscale_all_dim and params.get("attention_factor") is None:
        mscale = 1.0
    else:  # solve mscale(s, m) / mscale(s, mscale_all_dim) = attention for m
        mscale = (attention * _yarn_mscale(factor, mscale_all_dim) - 1.0) / (0.1 * math.log(factor))
    out.update(rope_factor=factor, original_seq_len=int(original),
               beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
               mscale=mscale, mscale_all_dim=mscale_all_dim)
    return out


def config_from_hf(raw: dict, name: str = "hf") -> tuple[ModelConfig, HFLayout]:
    """Map a DeepseekV3 config.json dict onto ModelConfig (mtp_depth = num_nextn_predict_layers).

    Raises HFFormatError for any value our model cannot reproduce exactly, and for unknown fields.
    """
    f = _Fields(raw)
    f.require("model_type", (HF_MODEL_TYPE,), f"'{HF_MODEL_TYPE}'", default=HF_MODEL_TYPE)
    f.require("hidden_act", ("silu",), "'silu' (SwiGLU experts)")
    f.require("attention_bias", (False,), "false (our projections have no bias)")
    f.require("tie_word_embeddings", (False,),
              "false (DeepSeek-V3 has a separate lm_head; our model does not tie)")
    f.require("scoring_func", ("sigmoid",), "'sigmoid' (DeepSeek-V3 affinities)", default="sigmoid")
    f.require("topk_method", ("noaux_tc",),
              "'noaux_tc' (bias-corrected group-limited top-k of DeepSeek-V3)", default="noaux_tc")
    f.require("moe_layer_freq", (1,), "1 (every layer after first_k_dense_replace is MoE)", default=1)
    if f.get("quantization_config", None) is not None:
        raise _unsupported("quantization_config", raw["quantization_config"],
                           "unquantised weights only: dequantise (e.g. FP8 -> BF16) first")
    dropout = f.get("attention_dropout")
    if dropout not in (0, 0.0, None):
        raise _unsupported("attention_dropout", dropout, "0 (our attention has no dropout)")
    eps = f.get("rms_norm_eps")
    if eps != HF_LATENT_NORM_EPS:
        raise _unsupported("rms_norm_eps", eps,
                           f"{HF_LATENT_NORM_EPS}: transformers normalises the q_a/kv_a latents with "
                           f"eps 1e-6 whatever rms_norm_eps says, our model uses one eps everywhere")
    n_heads = f.get("num_attention_heads")
    kv_heads = f.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != n_heads:
        raise _unsupported("num_key_value_heads", kv_heads,
                           f"equal to num_attention_heads ({n_heads}): MLA has no grouped KV heads")
    for key in ("first_k_dense_replace", "n_group", "topk_group", "num_experts_per_tok", "n_shared_experts"):
        if f.get(key) is None:
            raise _unsupported(key, None, "an integer (transformers' DeepseekV3 needs it too)")
    nope, rope_dim = f.get("qk_nope_head_dim"), f.get("qk_rope_head_dim")
    if "head_dim" in f and f.get("head_dim") != rope_dim:
        raise _unsupported("head_dim", raw["head_dim"], f"qk_rope_head_dim ({rope_dim}), as transformers derives it")
    if "qk_head_dim" in f and f.get("qk_head_dim") != nope + rope_dim:
        raise _unsupported("qk_head_dim", raw["qk_head_dim"], f"qk_nope_head_dim + qk_rope_head_dim ({nope + rope_dim})")
    interleave = f.get("rope_interleave")
    if interleave not in (True, False, None):
        raise _unsupported("rope_interleave", interleave, "true or false")
    mtp_layers = None
    for key in ("num_nextn_predict_layers", "num_mtp_layers"):
        if key in f:
            value = f.get(key)
            if mtp_layers is not None and value != mtp_layers:
                raise _unsupported(key, value, f"the same as the other MTP depth field ({mtp_layers})")
            mtp_layers = value
    kwargs: dict[str, Any] = {}
    if "aux_loss_alpha" in f:
        kwargs["balance_loss_alpha"] = float(f.get("aux_loss_alpha"))
        if kwargs["balance_loss_alpha"] > 0:
            f.require("seq_aux", (True,), "true (we implement the sequence-wise balance loss)", default=True)
    f.get("seq_aux", None)
    max_pos = f.get("max_position_embeddings")
    kwargs.update(_rope_from_hf(f, max_pos))
    norm_topk = f.get("norm_topk_prob")
    cfg = ModelConfig(
        name=name,
        vocab_size=f.get("vocab_size"), dim=f.get("hidden_size"), n_layers=f.get("num_hidden_layers"),
        n_dense_layers=f.get("first_k_dense_replace"), n_heads=n_heads,
        inter_dim=f.get("intermediate_size"), moe_inter_dim=f.get("moe_intermediate_size"),
        n_routed_experts=f.get("n_routed_experts"), n_shared_experts=f.get("n_shared_experts"),
        n_activated_experts=f.get("num_experts_per_tok"), n_expert_groups=f.get("n_group"),
        n_limited_groups=f.get("topk_group"), route_scale=float(f.get("routed_scaling_factor")),
        norm_topk_prob=bool(norm_topk), q_lora_rank=f.get("q_lora_rank"),
        kv_lora_rank=f.get("kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        v_head_dim=f.get("v_head_dim"), max_seq_len=max_pos, mtp_depth=mtp_layers or 0,
        norm_eps=float(eps), init_std=float(f.get("initializer_range")), **kwargs,
    )
    leftovers = f.leftovers()
    if leftovers:
        raise HFFormatError(
            f"HF config fields {leftovers} are unknown to this converter (values "
            f"{[raw[k] for k in leftovers]}): supported are the DeepseekV3Config fields; remove them "
            f"or extend dsv3_train/hf.py if they change the model")
    return cfg, HFLayout(rope_interleave=bool(interleave), mtp_layers=mtp_layers)


def config_to_hf(cfg: ModelConfig, rope_interleave: bool = True, dtype: Optional[torch.dtype] = None) -> dict:
    """The config.json of our model as a transformers DeepseekV3 checkpoint."""
    if cfg.norm_eps != HF_LATENT_NORM_EPS:
        raise HFFormatError(f"model.norm_eps={cfg.norm_eps} cannot be saved exactly: transformers' "
                            f"DeepseekV3 normalises the q_a/kv_a latents with eps 1e-6; use 1e-6")
    if cfg.rope_factor == 1.0:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim}
        ours = _yarn_mscale(cfg.rope_factor, cfg.mscale) / _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        if abs(_hf_attention_factor(rope, cfg.rope_factor) - ours) > 1e-12:
            rope["attention_factor"] = ours  # transformers' derivation would differ: say it
    out = {
        "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "routed_scaling_factor": cfg.route_scale, "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
        "aux_loss_alpha": cfg.balance_loss_alpha, "seq_aux": True,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim, "qk_head_dim": cfg.qk_head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rope_parameters": rope,
        "rope_interleave": rope_interleave, "rms_norm_eps": cfg.norm_eps,
        "num_nextn_predict_layers": cfg.mtp_depth, "tie_word_embeddings": False,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
    }
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


# ---------------------------------------------------------------------------- tensor names
def _block_pairs(cfg: ModelConfig, moe: bool) -> list[tuple[str, str, Optional[str]]]:
    """(our suffix, HF suffix, rope kind) for the non-expert tensors of one block."""
    pairs = [("attn_norm.weight", "input_layernorm.weight", None),
             ("ffn_norm.weight", "post_attention_layernorm.weight", None)]
    if cfg.q_lora_rank is None:
        pairs.append(("attn.wq.weight", "self_attn.q_proj.weight", "q"))
    else:
        pairs += [("attn.wq_a.weight", "self_attn.q_a_proj.weight", None),
                  ("attn.q_norm.weight", "self_attn.q_a_layernorm.weight", None),
                  ("attn.wq_b.weight", "self_attn.q_b_proj.weight", "q")]
    pairs += [("attn.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight", "kv"),
              ("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight", None),
              ("attn.wkv_b.weight", "self_attn.kv_b_proj.weight", None),
              ("attn.wo.weight", "self_attn.o_proj.weight", None)]
    if moe:
        pairs += [("ffn.router.weight", "mlp.gate.weight", None),
                  ("ffn.router.expert_bias", "mlp.gate.e_score_correction_bias", None)]
        if cfg.n_shared_experts:
            pairs += [("ffn.shared.w1.weight", "mlp.shared_experts.gate_proj.weight", None),
                      ("ffn.shared.w3.weight", "mlp.shared_experts.up_proj.weight", None),
                      ("ffn.shared.w2.weight", "mlp.shared_experts.down_proj.weight", None)]
    else:
        pairs += [("ffn.w1.weight", "mlp.gate_proj.weight", None),
                  ("ffn.w3.weight", "mlp.up_proj.weight", None),
                  ("ffn.w2.weight", "mlp.down_proj.weight", None)]
    return pairs


def _blocks(cfg: ModelConfig) -> Iterator[tuple[str, str, bool]]:
    """(our prefix, HF prefix, is MoE) of every block, MTP blocks as HF layers n_layers + k."""
    for i in range(cfg.n_layers):
        yield f"layers.{i}.", f"model.layers.{i}.", i >= cfg.n_dense_layers
    for k in range(cfg.mtp_depth):
        yield f"mtp.{k}.block.", f"model.layers.{cfg.n_layers + k}.", True


def _plain_pairs(cfg: ModelConfig) -> list[tuple[str, str, Optional[str]]]:
    """Every one-to-one (ours, HF, rope kind) tensor pair of the model."""
    pairs = [("embed.weight", "model.embed_tokens.weight", None),
             ("norm.weight", "model.norm.weight", None),
             ("head.weight", "lm_head.weight", None)]
    for ours, theirs, moe in _blocks(cfg):
        pairs += [(ours + a, theirs + b, kind) for a, b, kind in _block_pairs(cfg, moe)]
    for k in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.n_layers + k}."
        pairs += [(f"mtp.{k}.enorm.weight", hf + "enorm.weight", None),
                  (f"mtp.{k}.hnorm.weight", hf + "hnorm.weight", None),
                  (f"mtp.{k}.eh_proj.weight", hf + "eh_proj.weight", None),
                  (f"mtp.{k}.norm.weight", hf + "shared_head.norm.weight", None)]
    return pairs


def _rope_rows(cfg: ModelConfig, kind: str, n_rows: int) -> torch.Tensor:
    """Row indices of the rope dims in a q (H*(nope+rope) rows) or kv_a (kv_lora+rope rows) weight."""
    rope = torch.arange(cfg.qk_rope_head_dim)
    if kind == "q":
        starts = torch.arange(cfg.n_heads) * cfg.qk_head_dim + cfg.qk_nope_head_dim
        rows = (starts[:, None] + rope[None, :]).flatten()
    else:
        rows = cfg.kv_lora_rank + rope
    assert int(rows.max()) < n_rows
    return rows


def _half_to_interleaved(rope_dim: int) -> torch.Tensor:
    """perm with interleaved[j] = half_split[perm[j]]: [0, R/2, 1, R/2+1, ...]."""
    return torch.arange(rope_dim).view(2, rope_dim // 2).t().flatten()


def _permute_rope(weight: torch.Tensor, cfg: ModelConfig, kind: str, to_interleaved: bool) -> torch.Tensor:
    """Reorder the rope rows of a q/kv_a weight between HF's half-split and our interleaved layout."""
    perm = _half_to_interleaved(cfg.qk_rope_head_dim)
    if not to_interleaved:
        perm = torch.argsort(perm)
    rows = _rope_rows(cfg, kind, weight.shape[0]).view(-1, cfg.qk_rope_head_dim)
    out = weight.clone()
    out[rows.flatten()] = weight[rows[:, perm].flatten()]
    return out


# ------------------------------------------------------------------------------ safetensors
class _Store:
    """The tensors of a HF checkpoint directory, read lazily, with consumption tracking."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{path} holds no *.safetensors file")
            weight_map = None
        self.handles, self.file_of = {}, {}
        for name in files:
            if not (path / name).exists():
                raise FileNotFoundError(f"{INDEX_FILE} names {name}, which is not in {path}")
            handle = safe_open(str(path / name), framework="pt")
            self.handles[name] = handle
            for key in handle.keys():
                if key in self.file_of:
                    raise HFFormatError(f"tensor {key} is stored twice ({self.file_of[key]}, {name})")
                self.file_of[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.file_of.get(key) != name:
                    raise HFFormatError(f"{INDEX_FILE} puts {key} in {name}, but it is not there")
            unindexed = sorted(set(self.file_of) - set(weight_map))
            if unindexed:
                raise HFFormatError(f"tensors {unindexed[:10]} are in the shards but not in {INDEX_FILE}")
        self.consumed: set[str] = set()
        self.missing: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def take(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.file_of:
            self.missing.append(key)
            return None
        self.consumed.add(key)
        return self.handles[self.file_of[key]].get_tensor(key)

    def leftovers(self) -> list[str]:
        return sorted(set(self.file_of) - self.consumed)


def _mtp_layers_present(store: _Store, n_layers: int) -> int:
    k = 0
    while any(key.startswith(f"model.layers.{n_layers + k}.") for key in store.keys()):
        k += 1
    return k


def _fail(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise HFFormatError(f"{what}:\n  {shown}{more}")


# ----------------------------------------------------------------------------------- load
def load_hf_checkpoint(path, dtype: torch.dtype = torch.float32, *,
                       mtp_depth: Optional[int] = None) -> Transformer:
    """Read a HF DeepseekV3 checkpoint directory into our Transformer (returned in eval mode).

    ``mtp_depth``: None takes num_nextn_predict_layers from config.json (or, when absent, the number
    of MTP layers stored) and requires their tensors; an explicit smaller value (e.g. 0 for a
    checkpoint written by transformers' save_pretrained, which drops MTP weights) skips the
    remaining MTP layers on purpose. Parameters are cast to ``dtype``; the router weight and bias
    stay fp32 (as in transformers).
    """
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    cfg, layout = config_from_hf(raw, name=path.name or "hf")
    store = _Store(path)
    present = _mtp_layers_present(store, cfg.n_layers)
    declared = layout.mtp_layers if layout.mtp_layers is not None else present
    if mtp_depth is None:
        if declared > present:
            raise HFFormatError(
                f"config.json declares num_nextn_predict_layers={declared} but the checkpoint stores "
                f"{present} MTP layer(s) (model.layers.{cfg.n_layers + present}.* is absent; "
                f"transformers' save_pretrained does not write MTP weights): pass mtp_depth={present} "
                f"to load without them")
        mtp_depth = declared
    if not 0 <= mtp_depth <= present:
        raise HFFormatError(f"mtp_depth={mtp_depth} must be in [0, {present}] (MTP layers stored)")
    cfg = replace(cfg, mtp_depth=mtp_depth)
    for k in range(mtp_depth, present):  # dropped on request
        store.consumed.update(key for key in store.keys() if key.startswith(f"model.layers.{cfg.n_layers + k}."))

    model = Transformer(cfg)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []

    def put(ours: str, tensor: Optional[torch.Tensor], source: str) -> None:
        if tensor is None:
            return
        if ours not in expected:
            problems.append(f"{source} maps to {ours}, which our model does not have")
        elif tuple(tensor.shape) != tuple(expected[ours].shape):
            problems.append(f"{source} has shape {tuple(tensor.shape)}, our {ours} needs "
                            f"{tuple(expected[ours].shape)}")
        else:
            state[ours] = tensor

    for ours, theirs, kind in _plain_pairs(cfg):
        tensor = store.take(theirs)
        if tensor is not None and kind is not None and not layout.rope_interleave:
            tensor = _permute_rope(tensor, cfg, kind, to_interleaved=True)
        put(ours, tensor, theirs)
    for ours, theirs, moe in _blocks(cfg):
        if moe:
            _load_experts(store, cfg, theirs + "mlp.experts", ours + "ffn.experts", put)
            if not cfg.n_shared_experts:  # transformers builds a zero-width shared MLP: empty
                for part in ("gate_proj", "up_proj", "down_proj"):
                    key = f"{theirs}mlp.shared_experts.{part}.weight"
                    if key in store and store.take(key).numel() != 0:
                        problems.append(f"{key} is not empty but n_shared_experts is 0")
    for k in range(cfg.mtp_depth):  # DeepSeek stores copies of the shared embedding and head
        hf = f"model.layers.{cfg.n_layers + k}."
        for key, shared in ((hf + "embed_tokens.weight", "embed.weight"),
                            (hf + "shared_head.head.weight", "head.weight")):
            if key in store:
                copy = store.take(key)
                if shared in state and not torch.equal(copy.to(state[shared].dtype), state[shared]):
                    problems.append(f"{key} differs from the main model's {shared}: our MTP shares "
                                    f"the embedding and output head")
    _fail([f"tensor {key} is missing from the checkpoint" for key in store.missing] + problems,
          f"{path} does not match a DeepseekV3 model of this config")
    _fail([f"checkpoint tensor {key} was not consumed" for key in store.leftovers()],
          f"{path} holds tensors our model has no place for")
    _fail([f"our tensor {key} was not filled" for key in expected if key not in state],
          f"{path} does not fill every tensor of our model")
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("router.weight"):
                param.data = param.data.to(dtype)
    return model.eval()


def _load_experts(store: _Store, cfg: ModelConfig, theirs: str, ours: str, put) -> None:
    """Routed experts, fused (gate_up_proj, down_proj) or one tensor per expert (save_pretrained, Hub)."""
    if f"{theirs}.gate_up_proj" in store or f"{theirs}.down_proj" in store:
        put(f"{ours}.w13", store.take(f"{theirs}.gate_up_proj"), f"{theirs}.gate_up_proj")
        put(f"{ours}.w2", store.take(f"{theirs}.down_proj"), f"{theirs}.down_proj")
        return
    gates, ups, downs = [], [], []
    for e in range(cfg.n_routed_experts):
        gates.append(store.take(f"{theirs}.{e}.gate_proj.weight"))
        ups.append(store.take(f"{theirs}.{e}.up_proj.weight"))
        downs.append(store.take(f"{theirs}.{e}.down_proj.weight"))
    if any(t is None for t in gates + ups + downs):
        return  # reported as missing
    try:
        w13 = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gates, ups)])
        w2 = torch.stack(downs)
    except RuntimeError as error:
        raise HFFormatError(f"experts under {theirs} have inconsistent shapes: {error}") from None
    put(f"{ours}.w13", w13, f"{theirs}.*.gate_proj/up_proj.weight")
    put(f"{ours}.w2", w2, f"{theirs}.*.down_proj.weight")


# ----------------------------------------------------------------------------------- save
def hf_state_dict(model: Transformer, rope_interleave: bool = True,
                  mtp_shared_copies: bool = True) -> dict[str, torch.Tensor]:
    """Our model's tensors under HF DeepseekV3 names (per-expert layout, MTP as extra layers)."""
    cfg = model.cfg
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, theirs, kind in _plain_pairs(cfg):
        tensor = ours.pop(name)
        if kind is not None and not rope_interleave:
            tensor = _permute_rope(tensor, cfg, kind, to_interleaved=False)
        out[theirs] = tensor
    hidden = cfg.moe_inter_dim
    for prefix, theirs, moe in _blocks(cfg):
        if not moe:
            continue
        w13, w2 = ours.pop(prefix + "ffn.experts.w13"), ours.pop(prefix + "ffn.experts.w2")
        for e in range(cfg.n_routed_experts):
            out[f"{theirs}mlp.experts.{e}.gate_proj.weight"] = w13[e, :hidden]
            out[f"{theirs}mlp.experts.{e}.up_proj.weight"] = w13[e, hidden:]
            out[f"{theirs}mlp.experts.{e}.down_proj.weight"] = w2[e]
    if mtp_shared_copies:
        for k in range(cfg.mtp_depth):
            hf = f"model.layers.{cfg.n_layers + k}."
            out[hf + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
            out[hf + "shared_head.head.weight"] = out["lm_head.weight"]
    if ours:
        raise HFFormatError(f"our tensors {sorted(ours)} have no HF DeepseekV3 name")
    return out


def save_hf_checkpoint(model: Transformer, path, *, rope_interleave: bool = True,
                       dtype: Optional[torch.dtype] = None, mtp_shared_copies: bool = True) -> Path:
    """Write config.json + model.safetensors for transformers' DeepseekV3ForCausalLM.

    ``rope_interleave=False`` writes the half-split rope layout; ``dtype`` casts every tensor except
    the router weight and bias (kept fp32); ``mtp_shared_copies`` also stores the embedding and
    head under each MTP layer, as DeepSeek's checkpoints (and vLLM/SGLang MTP loaders) expect.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.cfg, rope_interleave=rope_interleave,
                          dtype=dtype or model.embed.weight.dtype)
    tensors = {}
    for name, tensor in hf_state_dict(model, rope_interleave, mtp_shared_copies).items():
        keep_fp32 = name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")
        if keep_fp32:
            tensor = tensor.float()
        elif dtype is not None:
            tensor = tensor.to(dtype)
        tensors[name] = tensor.to(device="cpu").contiguous().clone()  # safetensors: no shared storage
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


__all__ = ["HFFormatError", "HFLayout", "IGNORED_FIELDS", "config_from_hf", "config_to_hf",
           "hf_state_dict", "load_hf_checkpoint", "save_hf_checkpoint"]
