"""SFT: loss on completion tokens only (checked against an independent per-example computation),
packing that keeps documents apart, and steps that do not depend on micro-batching or packing."""
import torch
import torch.nn.functional as F

import pytest

from dsv3_train.config import ModelConfig
from dsv3_train.model import Transformer
from dsv3_train.posttrain.config import OptimConfig, SFTConfig
from dsv3_train.posttrain.data import (Example, Template, encode_examples, packed_batch, padded_batch, read_jsonl,
                                       write_jsonl)
from dsv3_train.posttrain.modeling import packed_forward
from dsv3_train.posttrain.sft import sft_step, train_sft
from dsv3_train.posttrain.tokenizer import CharTokenizer

IGNORE = -100
TOK = CharTokenizer()


def tiny_moe(balance_alpha: float = 0.0, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_dense_layers=1, n_heads=2, inter_dim=64,
                      moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1,
                      n_limited_groups=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      max_seq_len=64, mtp_depth=0, init_std=0.1, balance_loss_alpha=balance_alpha)
    torch.manual_seed(seed)
    return Transformer(cfg)


ROWS = [{"prompt": "12+34=", "completion": "<think>a</think><answer>46</answer>"},
        {"prompt": "5+5=", "completion": "<think>bb</think><answer>10</answer>"},
        {"prompt": "100+1=", "completion": "<answer>101</answer>"},
        {"prompt": "7+0=", "completion": "<think></think><answer>7</answer>"}]


def test_padded_batch_targets_are_the_completion_only():
    example = Example(prompt=[5, 6, 7], completion=[8, 9, 1])
    batch = padded_batch([example, Example([5], [1])], pad_id=0)
    assert batch.inputs.tolist() == [[5, 6, 7, 8, 9], [5, 0, 0, 0, 0]]
    assert batch.targets.tolist() == [[IGNORE, IGNORE, 8, 9, 1], [1, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_packed_rows_restart_positions_and_documents():
    examples = [Example([5, 6], [7, 1]), Example([8], [9, 1]), Example([4, 4, 4], [3, 1])]
    batch = packed_batch(examples, seq_len=8, pad_id=0)  # first fit, longest first: lengths 4 + 3 | 2
    assert batch.inputs.tolist() == [[4, 4, 4, 3, 5, 6, 7, 0], [8, 9, 0, 0, 0, 0, 0, 0]]
    assert batch.targets.tolist() == [[IGNORE, IGNORE, 3, 1, IGNORE, 7, 1, IGNORE], [9, 1] + [IGNORE] * 6]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1], [0, 0] + [-1] * 6]
    with pytest.raises(ValueError, match="seq_len"):
        packed_batch(examples, seq_len=3, pad_id=0)


def test_packed_forward_equals_each_document_alone():
    model = tiny_moe().eval()
    docs = [[3, 17, 22, 9], [40, 2, 2], [11, 12, 13, 14, 15]]
    ids = torch.tensor([sum(docs, [])])
    positions = torch.tensor([sum((list(range(len(d))) for d in docs), [])])
    doc_ids = torch.tensor([sum(([i] * len(d) for i, d in enumerate(docs)), [])])
    with torch.no_grad():
        packed, _ = packed_forward(model, ids, positions, doc_ids)
        alone = torch.cat([model(torch.tensor([d]))[0] for d in docs])
    torch.testing.assert_close(packed[0], alone, atol=1e-5, rtol=1e-5)


def _reference_loss(model, examples) -> float:
    """Mean cross-entropy over every completion token, one example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            tokens = torch.tensor([e.prompt + e.completion])
            logits = model(tokens[:, :-1])[0, len(e.prompt) - 1:]  # positions predicting the completion
            total += F.cross_entropy(logits, torch.tensor(e.completion), reduction="sum").item()
            count += len(e.completion)
    return total / count


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_is_the_mean_cross_entropy_over_completion_tokens(packing):
    model = tiny_moe()
    examples = encode_examples(ROWS, TOK)
    expected = _reference_loss(model, examples)
    cfg = SFTConfig(batch_size=4, micro_batch_size=3, packing=packing, seq_len=48)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    assert sft_step(model, optimizer, examples, cfg, TOK.pad_id)["loss"] == pytest.approx(expected, rel=1e-5)


def _params_after_step(cfg: SFTConfig) -> torch.Tensor:
    model = tiny_moe()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sft_step(model, optimizer, encode_examples(ROWS, TOK), cfg, TOK.pad_id)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_micro_batching_and_packing_give_the_same_step():
    reference = _params_after_step(SFTConfig(batch_size=4, micro_batch_size=4, optim=OptimConfig(grad_clip=0)))
    for cfg in (SFTConfig(batch_size=4, micro_batch_size=1, optim=OptimConfig(grad_clip=0)),
                SFTConfig(batch_size=4, micro_batch_size=4, packing=True, seq_len=64, optim=OptimConfig(grad_clip=0))):
        torch.testing.assert_close(_params_after_step(cfg), reference, atol=1e-6, rtol=1e-5)


def test_train_sft_learns_a_fixed_completion():
    model = tiny_moe()
    examples = encode_examples(ROWS, TOK)
    history = train_sft(model, examples, SFTConfig(steps=30, batch_size=4, micro_batch_size=4, log_every=29,
                                                   optim=OptimConfig(lr=1e-2, warmup_steps=2)), TOK.pad_id)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_jsonl_round_trip_template_and_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "d" / "sft.jsonl", ROWS)
    assert read_jsonl(path) == ROWS
    (example,) = encode_examples(ROWS[:1], TOK, Template(prefix="Q:", suffix="\n"))
    assert TOK.decode(example.prompt) == "Q:12+34=\n"
    assert example.completion[-1] == TOK.eos_id
    with pytest.raises(ValueError, match="completion"):
        encode_examples([{"prompt": "1+1="}], TOK)
