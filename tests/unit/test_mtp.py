"""Multi-token prediction: target shifting at sequence ends and packed-document boundaries."""
import torch
import torch.nn.functional as F

from dsv3_train.config import ModelConfig
from dsv3_train.model import IGNORE_INDEX, Transformer, shifted_targets

X = IGNORE_INDEX
EOS = 0


def test_targets_shift_and_mask_document_boundaries():
    tokens = torch.tensor([[5, 6, EOS, 7, 8]])  # docs: [5 6 EOS] [7 8]
    assert shifted_targets(tokens, 1, EOS).tolist() == [[6, EOS, X, 8]]
    assert shifted_targets(tokens, 2, EOS).tolist() == [[EOS, X, X]]
    assert shifted_targets(tokens, 1, None).tolist() == [[6, EOS, 7, 8]]


def test_targets_across_several_documents_per_row():
    tokens = torch.tensor([[1, EOS, 2, EOS, 3, 4], [EOS, 9, 9, 9, EOS, 1]])
    assert shifted_targets(tokens, 1, EOS).tolist() == [[EOS, X, EOS, X, 4], [X, 9, 9, EOS, X]]
    assert shifted_targets(tokens, 2, EOS).tolist() == [[X, X, X, X], [X, 9, EOS, X]]


def _tiny(mtp_depth=1):
    return ModelConfig(vocab_size=50, dim=32, n_layers=2, n_dense_layers=1, n_heads=2, inter_dim=64,
                       moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_expert_groups=2,
                       n_limited_groups=1, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8, max_seq_len=32, mtp_depth=mtp_depth, init_std=0.2)


def _mtp_logits(model, tokens, k=1):
    """Logits of MTP depth 1 at every valid position, recomputed from the modules by hand."""
    seq = tokens.shape[1] - 1
    h, _ = model.forward_hidden(tokens[:, :seq])
    module = model.mtp[0]
    merged = module.eh_proj(torch.cat([module.enorm(model.embed(tokens[:, 1:seq])), module.hnorm(h[:, :seq - 1])], -1))
    cos, sin = model.rope(seq - 1)
    h1, _ = module.block(merged, cos, sin)
    return model.head(module.norm(h1))  # (B, T-1, V)


def test_mtp_loss_predicts_two_ahead_from_next_embedding():
    torch.manual_seed(0)
    model = Transformer(_tiny()).eval()
    tokens = torch.randint(1, 50, (2, 9))
    terms = model.loss(tokens, mtp_weight=0.3)
    logits = _mtp_logits(model, tokens)
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 2:].flatten())
    torch.testing.assert_close(terms.mtp[0], expected)
    main = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(terms.main, main)
    torch.testing.assert_close(terms.total, main + 0.3 * expected + terms.balance)


def test_mtp_position_sees_next_token_but_not_its_target():
    torch.manual_seed(0)
    model = Transformer(_tiny()).eval()
    tokens = torch.randint(1, 50, (1, 9))
    base = _mtp_logits(model, tokens)
    changed_next = tokens.clone()
    changed_next[0, 4] = (tokens[0, 4] % 49) + 1  # t_{i+1} for i = 3
    changed_target = tokens.clone()
    changed_target[0, 5] = (tokens[0, 5] % 49) + 1  # t_{i+2} for i = 3: the target, not an input of i
    assert not torch.allclose(_mtp_logits(model, changed_next)[0, 3], base[0, 3])
    torch.testing.assert_close(_mtp_logits(model, changed_target)[0, 3], base[0, 3])


def test_mtp_depth_two_uses_one_fewer_position_per_depth():
    torch.manual_seed(0)
    model = Transformer(_tiny(mtp_depth=2)).eval()
    tokens = torch.randint(1, 50, (2, 9))
    terms = model.loss(tokens, mtp_weight=0.4)
    assert len(terms.mtp) == 2
    torch.testing.assert_close(terms.total, terms.main + 0.4 / 2 * (terms.mtp[0] + terms.mtp[1]) + terms.balance)
