"""Splitting the model into pipeline stages (one process: no ranks needed to place stages)."""
import pytest
import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model.transformer import Transformer
from parallel.pipeline.schedules import ScheduleError
from parallel.pipeline.stage import split_model

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=8, n_dense_layers=1, n_heads=2, inter_dim=64,
                  moe_inter_dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                  n_expert_groups=2, n_limited_groups=1, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16, mtp_depth=1)
CASES = [("1f1b", 2), ("1f1b", 4), ("zb1p", 4), ("dualpipe", 2), ("dualpipe", 4), ("dualpipev", 2),
         ("dualpipev", 4)]


def _all_ranks(schedule: str, pp: int, cfg: ModelConfig = CFG):
    """What every rank keeps, each having built the model from the same seed."""
    ranks = []
    for rank in range(pp):
        torch.manual_seed(0)
        ranks.append(split_model(Transformer(cfg), schedule, pp, rank))
    return ranks


def _layers(stage) -> list[int]:
    return [int(i) for i in stage.layers]


@pytest.mark.parametrize("schedule, pp", CASES)
def test_stages_are_equal_contiguous_runs_of_blocks_in_forward_order(schedule, pp):
    held = {}
    for ranks in _all_ranks(schedule, pp):
        for name, stage in ranks.stages.items():
            held[stage.index] = _layers(stage)
    n_stages = 2 * pp if schedule == "dualpipev" else pp
    per = CFG.n_layers // n_stages
    assert held == {s: list(range(s * per, (s + 1) * per)) for s in range(n_stages)}


@pytest.mark.parametrize("schedule, pp", CASES)
def test_embedding_on_the_first_stage_norm_head_and_mtp_on_the_last(schedule, pp):
    for ranks in _all_ranks(schedule, pp):
        for stage in ranks.stages.values():
            if stage.is_first:
                assert stage.embed is ranks.embed is not None
            assert hasattr(stage, "head") == stage.is_last == hasattr(stage, "mtp")
            if stage.is_last:
                assert stage.embed is ranks.embed is not None  # MTP embeds t_{i+k} with it


def test_dualpipe_end_ranks_run_both_ends_on_one_embedding():
    ranks = _all_ranks("dualpipe", 4)
    for rank, (first_direction, last_direction) in ((0, (0, 1)), (3, (1, 0))):
        first, last = ranks[rank].chunk(first_direction, 0), ranks[rank].chunk(last_direction, 3)
        assert first.is_first and last.is_last and first.embed is last.embed is ranks[rank].embed
    assert ranks[1].embed is None and ranks[2].embed is None


def test_dualpipev_rank_zero_runs_both_ends_on_one_embedding():
    ranks = _all_ranks("dualpipev", 2)
    assert {stage.index for stage in ranks[0].stages.values()} == {0, 3}
    assert ranks[0].chunk(0, 0).embed is ranks[0].chunk(0, 3).embed is ranks[0].embed
    assert ranks[0].copy_sync() is None and ranks[1].embed is None


def test_dualpipe_mirrored_ranks_hold_the_same_parameters_and_sync_all_of_them():
    ranks = _all_ranks("dualpipe", 4)
    for rank in range(4):
        mirror = ranks[3 - rank]
        names = sorted(ranks[rank].canonical_parameters())
        assert names == sorted(mirror.canonical_parameters())
        sync = ranks[rank].copy_sync()
        assert sync.peer == 3 - rank and sync.names == names


def test_1f1b_last_rank_keeps_an_embedding_copy_summed_with_rank_zero():
    ranks = _all_ranks("1f1b", 4)
    assert ranks[0].copy_sync().peer == 3 and ranks[3].copy_sync().peer == 0
    assert ranks[0].copy_sync().names == ranks[3].copy_sync().names == ["embed.weight"]
    assert ranks[1].copy_sync() is None and ranks[2].embed is None
    assert torch.equal(ranks[0].embed.weight, ranks[3].embed.weight)


@pytest.mark.parametrize("schedule, pp", CASES)
def test_every_parameter_counts_once_in_the_gradient_norm(schedule, pp):
    counted = {}
    for ranks in _all_ranks(schedule, pp):
        for name in ranks.canonical_parameters():
            counted[name] = counted.get(name, 0) + ranks.counts_in_norm(name)
    torch.manual_seed(0)
    assert counted == {name: 1 for name, _ in Transformer(CFG).named_parameters()}


def test_no_mtp_means_no_embedding_on_the_last_rank():
    cfg = ModelConfig(**{**CFG.__dict__, "mtp_depth": 0})
    ranks = _all_ranks("1f1b", 2, cfg)
    assert ranks[1].embed is None and ranks[1].copy_sync() is None


@pytest.mark.parametrize("schedule, pp, n_layers", [("dualpipev", 2, 6), ("1f1b", 4, 6), ("dualpipe", 4, 2)])
def test_refuses_layer_counts_that_do_not_split_into_equal_stages(schedule, pp, n_layers):
    cfg = ModelConfig(**{**CFG.__dict__, "n_layers": n_layers})
    with pytest.raises(ScheduleError, match=rf"n_layers \({n_layers}\) .* choose n_layers in"):
        split_model(Transformer(cfg), schedule, pp, 0)
