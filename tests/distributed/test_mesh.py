"""ParallelDims: rules refused before any process group exists; mesh groups match the documented layout."""
import pytest
import torch.distributed as dist

from dsv3_train.config import ConfigError, ModelConfig
from parallel.mesh import ParallelDims
from parallel.testing import run_ranks


@pytest.mark.parametrize("kwargs, world, needle", [
    (dict(dp=4, ep=3), None, "parallel.ep (3) must divide parallel.dp (4): experts are sharded inside the data-parallel axis; choose ep in [1, 2, 4]"),
    (dict(dp=0), None, "parallel.dp (0) must be an integer >= 1"),
    (dict(dp=2), 3, "world size (3) must equal pp (1) x dp (2) = 2: launch 2 processes or set parallel.dp=3"),
    (dict(pp=2, dp=2), 5, "world size (5) must equal pp (2) x dp (2) = 4: launch 4 processes or choose pp in [1, 5]"),
])
def test_invalid_layouts_are_refused_before_any_process_group(kwargs, world, needle):
    with pytest.raises(ConfigError) as error:
        ParallelDims(**kwargs).validate(world_size=world)
    assert needle in str(error.value)
    assert not dist.is_initialized()


def test_expert_count_and_stage_count_rules():
    model = ModelConfig(n_routed_experts=6, n_expert_groups=3, n_limited_groups=1, n_layers=3)
    with pytest.raises(ConfigError, match=r"parallel.ep \(4\) must divide model.n_routed_experts \(6\): choose ep in \[1, 2\]"):
        ParallelDims(dp=4, ep=4).validate(model=model)
    with pytest.raises(ConfigError, match=r"parallel.pp \(4\) exceeds model.n_layers \(3\)"):
        ParallelDims(pp=4).validate(model=model)


def test_rank_coordinates_put_ep_ranks_next_to_each_other():
    dims = ParallelDims(pp=2, dp=4, ep=2)
    coords = [dims.rank_coordinates(r) for r in range(8)]
    assert [c["pp"] for c in coords] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [c["ep"] for c in coords] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [c["edp"] for c in coords] == [0, 0, 1, 1, 0, 0, 1, 1]


def _group_members(rank, world, pp, dp, ep):
    mesh = ParallelDims(pp=pp, dp=dp, ep=ep).build_mesh("cpu")
    members = {axis: dist.get_process_group_ranks(mesh.group(axis)) for axis in ("pp", "dp", "edp", "ep")}
    members["ep_counts"] = dist.get_process_group_ranks(mesh.group("ep_counts"))
    members["ep_counts is its own group"] = mesh.group("ep_counts") is not mesh.group("ep")
    return members


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pp, dp, ep", [(2, 2, 2), (1, 4, 2)])
def test_mesh_groups_follow_the_rank_formula(pp, dp, ep):
    members = run_ranks(_group_members, pp * dp, pp, dp, ep, timeout=100)
    dims = ParallelDims(pp=pp, dp=dp, ep=ep)
    for rank, groups in enumerate(members):
        me = dims.rank_coordinates(rank)
        expected = {axis: [r for r in range(pp * dp)
                           if all(dims.rank_coordinates(r)[a] == me[a] for a in keep)]
                    for axis, keep in (("pp", ["dp"]), ("dp", ["pp"]), ("ep", ["pp", "edp"]),
                                       ("edp", ["pp", "ep"]))}
        expected["ep_counts"] = expected["ep"]  # the same ranks, another group
        expected["ep_counts is its own group"] = True
        assert groups == expected, (rank, groups, expected)


def _dispatch_groups(rank, world):
    """Which group each all_to_all_single of one dispatch and combine ran on."""
    import torch

    from parallel.expert import AllToAllDispatcher

    mesh = ParallelDims(dp=2, ep=2).build_mesh("cpu")
    ep, counts = mesh.group("ep"), mesh.group("ep_counts")
    calls = []
    plain = dist.all_to_all_single

    def logged(*args, group=None, **kwargs):
        calls.append("ep" if group is ep else "ep_counts" if group is counts else "other")
        return plain(*args, group=group, **kwargs)

    dist.all_to_all_single = logged
    dispatcher = AllToAllDispatcher(4, ep, counts)
    x = torch.randn(6, 8)
    rows, per_expert, handle = dispatcher.dispatch(x, torch.randint(0, 4, (6, 2)))
    dispatcher.combine(rows, torch.ones(6, 2), handle)
    dist.all_to_all_single = plain
    return calls


@pytest.mark.timeout(120)
def test_the_dispatchers_count_exchange_runs_on_its_own_group():
    for calls in run_ranks(_dispatch_groups, 2, timeout=100):
        assert calls == ["ep_counts", "ep", "ep"]  # counts, rows out, rows back


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()


@pytest.mark.timeout(120)
def test_harness_propagates_a_child_failure():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
