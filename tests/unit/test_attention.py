"""MLA against a naive per-head attention written here from the same weights."""
import math

import pytest
import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model.attention import MultiHeadLatentAttention
from dsv3_train.model.rope import rope_tables


def _rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rotate_complex(x, cos, sin):
    """Interleaved-pair rotation as complex multiplication, for one (T, R) tensor."""
    z = torch.view_as_complex(x.double().reshape(x.shape[0], -1, 2).contiguous())
    z = z * torch.complex(cos.double(), sin.double())
    return torch.view_as_real(z).reshape(x.shape)


def naive_mla(attn: MultiHeadLatentAttention, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    batch, seq, _ = x.shape
    cos, sin = rope_tables(cfg)
    cos, sin = cos[:seq], sin[:seq]
    eps = cfg.norm_eps
    out = torch.zeros(batch, seq, cfg.dim, dtype=torch.float64)
    qk = cfg.qk_head_dim
    mscale = 0.1 * cfg.mscale_all_dim * math.log(cfg.rope_factor) + 1
    scale = qk ** -0.5 * mscale ** 2
    for b in range(batch):
        xb = x[b].double()
        if cfg.q_lora_rank is None:
            q_all = xb @ attn.wq.weight.double().T
        else:
            c_q = _rms(xb @ attn.wq_a.weight.double().T, attn.q_norm.weight.double(), eps)
            q_all = c_q @ attn.wq_b.weight.double().T
        kv_a = xb @ attn.wkv_a.weight.double().T
        c_kv = _rms(kv_a[:, : cfg.kv_lora_rank], attn.kv_norm.weight.double(), eps)
        k_rope = _rotate_complex(kv_a[:, cfg.kv_lora_rank:], cos, sin)  # shared by heads
        kv_b = c_kv @ attn.wkv_b.weight.double().T
        heads = []
        for h in range(cfg.n_heads):
            q_h = q_all[:, h * qk:(h + 1) * qk]
            q_h = torch.cat([q_h[:, : cfg.qk_nope_head_dim], _rotate_complex(q_h[:, cfg.qk_nope_head_dim:], cos, sin)], -1)
            per = cfg.qk_nope_head_dim + cfg.v_head_dim
            k_nope = kv_b[:, h * per: h * per + cfg.qk_nope_head_dim]
            v_h = kv_b[:, h * per + cfg.qk_nope_head_dim:(h + 1) * per]
            k_h = torch.cat([k_nope, k_rope], -1)
            scores = (q_h @ k_h.T) * scale
            scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), -math.inf)
            heads.append(scores.softmax(-1) @ v_h)
        out[b] = torch.cat(heads, -1) @ attn.wo.weight.double().T
    return out


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("rope_factor", [1.0, 40.0])
def test_mla_equals_naive_per_head_attention(q_lora_rank, rope_factor):
    cfg = ModelConfig(dim=48, n_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=6, v_head_dim=10, max_seq_len=64, rope_factor=rope_factor,
                      original_seq_len=16, mscale_all_dim=1.0)
    attn = MultiHeadLatentAttention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 11, cfg.dim)
    cos, sin = rope_tables(cfg)
    got = attn(x, cos[:11], sin[:11])
    torch.testing.assert_close(got.double(), naive_mla(attn, cfg, x), rtol=1e-5, atol=1e-5)


def test_mla_is_causal():
    cfg = ModelConfig(dim=32, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    attn = MultiHeadLatentAttention(cfg)
    cos, sin = rope_tables(cfg)
    x = torch.randn(1, 9, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 3, 32)  # change the future only
    torch.testing.assert_close(attn(x, cos[:9], sin[:9])[:, :6], attn(y, cos[:9], sin[:9])[:, :6])
