"""YaRN frequencies and mscale against the formulas (V3 report / YaRN paper)."""
import math

import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model.rope import rope_frequencies, rope_tables, softmax_scale, yarn_mscale


def _v3_rope(**overrides):
    base = dict(qk_rope_head_dim=64, rope_theta=10000.0, rope_factor=40.0, original_seq_len=4096,
                beta_fast=32.0, beta_slow=1.0, max_seq_len=256)
    base.update(overrides)
    return ModelConfig(**base)


def test_yarn_mscale_matches_point_one_ln_s_plus_one():
    assert abs(yarn_mscale(40.0) - (0.1 * math.log(40.0) + 1)) < 1e-12
    assert abs(yarn_mscale(40.0) - 1.3689) < 1e-4
    assert yarn_mscale(1.0) == 1.0
    assert abs(yarn_mscale(40.0, 0.707) - (0.0707 * math.log(40) + 1)) < 1e-12


def test_softmax_scale_is_multiplied_by_mscale_squared():
    cfg = _v3_rope()
    plain = 1 / math.sqrt(cfg.qk_nope_head_dim + 64)
    assert abs(softmax_scale(cfg) - plain * (0.1 * math.log(40) + 1) ** 2) < 1e-12
    assert abs(softmax_scale(_v3_rope(rope_factor=1.0)) - plain) < 1e-12


def test_yarn_frequencies_follow_rotation_count_ramp():
    cfg = _v3_rope()
    dim, base, s, orig = 64, 10000.0, 40.0, 4096
    theta = [base ** (-2 * i / dim) for i in range(dim // 2)]
    # Pair index at which a frequency makes r full turns over the original context.
    def index_for(r):
        return dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))
    low, high = math.floor(index_for(32.0)), math.ceil(index_for(1.0))
    expected = []
    for i, t in enumerate(theta):
        ramp = min(1.0, max(0.0, (i - low) / (high - low)))
        expected.append(t * (1 - ramp) + t / s * ramp)
    got = rope_frequencies(cfg)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    # fast pairs (many turns) are kept; slow pairs (< 1 turn) are divided by s
    assert abs(got[0].item() - theta[0]) < 1e-7
    assert abs(got[-1].item() - theta[-1] / s) / (theta[-1] / s) < 1e-6
    assert 0 < low < high < dim // 2


def test_without_yarn_frequencies_are_plain_rope_and_tables_unscaled():
    cfg = _v3_rope(rope_factor=1.0)
    expected = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    torch.testing.assert_close(rope_frequencies(cfg).double(), expected, rtol=1e-6, atol=0)
    cos, sin = rope_tables(cfg)
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones_like(cos))
    torch.testing.assert_close(cos[5, 3].double(), torch.tensor(math.cos(5 * expected[3].item()), dtype=torch.float64))


def test_rope_tables_carry_mscale_ratio():
    cfg = _v3_rope(mscale=1.0, mscale_all_dim=0.5)
    cos, sin = rope_tables(cfg)
    ratio = (0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1)
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, ratio ** 2))
