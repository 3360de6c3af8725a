"""Parameter counts and a per-GPU memory estimate, from the config alone (no torch, no model).

Parameter counts follow ``dsv3_train/model`` tensor for tensor (tests compare them with an
instantiated model). The memory estimate is bookkeeping, not a measurement:

- **weights, gradients, optimizer state**: parameters held by a rank times bytes per parameter
  of the precision recipe (``PRECISIONS``); ZeRO shards optimizer state (stage >= 1), gradients
  (>= 2) and weights (3) over ``dp`` for dense parameters and over ``edp`` for experts, which
  expert parallelism has already split over ``ep``.
- **activations**: bytes saved for backward per token and block (``block_activation_bytes``),
  times tokens per micro-batch, times blocks per stage, times the micro-batches a schedule keeps
  in flight (DeepSeek-V3 report, DualPipe table: 1F1B PP, DualPipe PP+1; DualPipeV PP+1 on its
  2P-stage model). Attention is assumed fused (no T x T scores kept).
- **MLA KV latents**: c_KV + the shared rope key of every token and block in flight (part of the
  activations, shown on its own line because MLA makes it small).
- **logits**: the output head's (and each MTP module's) logits of one micro-batch, kept for the
  loss backward on the rank that holds the last stage.
- **overhead**: a fixed allowance for the CUDA context, NCCL and all-to-all buffers and allocator
  fragmentation (``OVERHEAD_GIB``).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
OVERHEAD_GIB = 4.0
"""CUDA context (~0.5 GiB), NCCL / all-to-all buffers and allocator fragmentation."""


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter (weights, gradients, optimizer state) and per activation element."""

    name: str
    weight: int
    grad: int
    optim: int
    act: int
    note: str


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 8, 4, "fp32 weights/grads, AdamW moments fp32"),
    "bf16": Precision("bf16", 4, 4, 8, 2, "fp32 master weights/grads, bf16 autocast activations"),
    # DeepSeek-V3 sec. 3.3: bf16 working weights, fp32 master weights (ZeRO-sharded with the
    # optimizer) and fp32 gradients, AdamW moments in bf16; fp8 GEMMs with fp8-cached inputs.
    "fp8": Precision("fp8", 2, 4, 4 + 2 + 2, 2, "V3 recipe: bf16 weights, fp32 grads + master, bf16 moments"),
}
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Params:
    """Parameter count split by how it is sharded: dense (over dp) and routed experts (over ep)."""

    dense: int = 0
    expert: int = 0

    def __add__(self, other: "Params") -> "Params":
        return Params(self.dense + other.dense, self.expert + other.expert)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def attention_params(m) -> int:
    """MLA: q (direct, or down-proj + norm + up-proj), kv down-proj to c_KV + rope key, kv norm,
    kv up-proj to per-head [k_nope; v], output projection."""
    q_dim = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
    q = m.dim * q_dim if m.q_lora_rank is None else m.dim * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * q_dim
    kv = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
    kv += m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + m.n_heads * m.v_head_dim * m.dim


def block_params(m, moe: bool) -> Params:
    """One transformer block: two RMSNorms, MLA, and a SwiGLU FFN or a DeepSeekMoE layer."""
    dense = 2 * m.dim + attention_params(m)
    if not moe:
        return Params(dense + 3 * m.dim * m.inter_dim)
    shared = 3 * m.dim * m.n_shared_experts * m.moe_inter_dim
    router = m.n_routed_experts * m.dim
    return Params(dense + shared + router, m.n_routed_experts * 3 * m.dim * m.moe_inter_dim)


def embedding_params(m) -> int:
    return m.vocab_size * m.dim


def head_params(m) -> int:
    """Final RMSNorm and the output projection."""
    return m.dim + m.vocab_size * m.dim


def mtp_params(m) -> Params:
    """One MTP module (V3 eq. 21): two RMSNorms, the 2d -> d projection M_k, a MoE block, its
    output norm; embedding and head are shared with the main model."""
    return Params(3 * m.dim + 2 * m.dim * m.dim) + block_params(m, moe=True)


@dataclass(frozen=True)
class ModelSize:
    total: int
    """All parameters, MTP modules included."""
    main: int
    """The main model (what the V3 report's 671B counts)."""
    active: int
    """Main-model parameters one token uses: everything but the n_routed - top-k idle experts."""


def model_size(m) -> ModelSize:
    blocks = [block_params(m, i >= m.n_dense_layers) for i in range(m.n_layers)]
    main = sum((b for b in blocks), Params()) + Params(embedding_params(m) + head_params(m))
    total = main + sum((mtp_params(m) for _ in range(m.mtp_depth)), Params())
    per_expert = 3 * m.dim * m.moe_inter_dim
    idle = (m.n_routed_experts - m.n_activated_experts) * per_expert * (m.n_layers - m.n_dense_layers)
    return ModelSize(total=total.total, main=main.total, active=main.total - idle)


def block_activation_bytes(m, moe: bool, precision: Precision, recompute: str) -> float:
    """Bytes one token leaves saved for backward in one block.

    none: every tensor a backward needs; selective (V3 sec. 3.2.3 / 3.3.2): RMSNorm outputs,
    the MLA up-projections (q, k, v from their latents), SwiGLU outputs and expert outputs are
    recomputed, and with fp8 the inputs of the expert and output-projection GEMMs are cached in
    fp8 (1 byte); full: only the block input is kept (the block is recomputed in backward)."""
    a = precision.act
    if recompute == "full":
        return m.dim * a
    low = 1 if precision.name == "fp8" else a  # fp8-cached GEMM inputs
    heads, qk = m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim
    latent = (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim
    # attention: block input, latents, attention output (wo input), softmax log-sum-exp (fp32)
    attn = m.dim * a + latent * a + heads * m.v_head_dim * low + heads * 4
    if recompute == "none":  # normed input, normed q latent, q, k, v
        attn += m.dim * a + (m.q_lora_rank or 0) * a + heads * (2 * qk + m.v_head_dim) * a
    if not moe:
        ffn = m.dim * a + 2 * m.inter_dim * low  # input, SwiGLU inputs (gate, up)
        if recompute == "none":
            ffn += m.dim * a + m.inter_dim * a  # normed input, SwiGLU output (w2 input)
        return attn + ffn
    k, hidden = m.n_activated_experts, m.moe_inter_dim
    shared = m.n_shared_experts * hidden
    # input, fp32 router scores, dispatched token copies, SwiGLU inputs (routed + shared)
    ffn = m.dim * a + m.n_routed_experts * 4 + k * m.dim * low + 2 * (k * hidden + shared) * low
    if recompute == "none":  # normed input, SwiGLU outputs, expert outputs (for the gate gradient)
        ffn += m.dim * a + (k * hidden + shared) * a + k * m.dim * a
    return attn + ffn


def kv_latent_bytes(m, precision: Precision) -> int:
    """Per token and block: the compressed KV latent c_KV plus the rope key shared by all heads."""
    return (m.kv_lora_rank + m.qk_rope_head_dim) * precision.act
