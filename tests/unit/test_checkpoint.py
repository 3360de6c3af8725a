"""Checkpoints are atomic: a crash mid-save leaves the previous one loadable and nothing half-written."""
import pytest
import torch

from dsv3_train import checkpoint as ckpt


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise RuntimeError("node lost mid-save")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {"step": 2})
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    fresh, fresh_optimizer = _model_and_optimizer()
    assert ckpt.load_checkpoint(tmp_path / "step_00000001", fresh, fresh_optimizer) == {"step": 1}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key])


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model, optimizer = _model_and_optimizer()
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_optimizer_moments_round_trip(tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 7, model, optimizer, {"step": 7})
    fresh, fresh_optimizer = _model_and_optimizer()
    ckpt.load_checkpoint(tmp_path / "step_00000007", fresh, fresh_optimizer)
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_resume_from_an_incomplete_directory_names_the_fix(tmp_path):
    model, optimizer = _model_and_optimizer()
    with pytest.raises(FileNotFoundError, match="point it at a step_"):
        ckpt.load_checkpoint(tmp_path, model, optimizer)


def _ranks_holding_different_parameters(rank, world, root):
    """Like pipeline stages: rank 0 holds a0.*, rank 1 b0.* and b1.*; two param groups with their own
    weight decay. Save, then load into fresh optimizers: each keeps its own names and settings."""
    torch.manual_seed(rank)
    model = torch.nn.ModuleDict({f"{'ab'[rank]}{i}": torch.nn.Linear(4, 4) for i in range(1 + rank)})

    def build():
        return torch.optim.AdamW([{"params": [m.weight for m in model.values()], "weight_decay": 0.1},
                                  {"params": [m.bias for m in model.values()], "weight_decay": 0.0}],
                                 lr=3e-3)

    optimizer = build()
    sum(m(torch.randn(2, 4)).sum() for m in model.values()).backward()
    optimizer.step()
    saved = {name: optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}
    ckpt.save_checkpoint(root, 1, model, optimizer, {"step": 1})
    model.zero_grad(set_to_none=True)  # as after a trainer step (DCP initialises a gradless optimizer)
    fresh = build()
    ckpt.load_checkpoint(root / "step_00000001", model, fresh)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in fresh.param_groups]
    loaded = {name: fresh.state[p]["exp_avg"] for name, p in model.named_parameters()}
    return groups, saved, loaded


def test_ranks_holding_different_parameters_keep_their_param_group_settings(tmp_path):
    from parallel.testing import run_ranks

    for groups, saved, loaded in run_ranks(_ranks_holding_different_parameters, 2, tmp_path, timeout=60):
        assert [g.get("weight_decay") for g in groups] == [0.1, 0.0]
        assert all(g.get("lr") == 3e-3 and g.get("betas") == (0.9, 0.999) for g in groups)
        assert set(loaded) == set(saved)  # each rank's own parameters, with their own moments
        assert all(torch.equal(loaded[name], saved[name]) for name in saved)
