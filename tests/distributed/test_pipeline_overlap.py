"""The phase-split MoE block and the overlapped forward&backward pair (2 gloo ranks, ep=2).

Specifications: the phase split computes what ``Block.forward`` and one ``backward`` compute
(to fp32 rounding); the overlapped pair computes bit-for-bit what forward-then-backward does;
in the pair every all-to-all is in flight while the other micro-batch computes; the emulated
link's wait returns at launch + latency + bytes / bandwidth, and compute in between hides it;
the wait filler runs queued weight-gradient GEMMs only while an exchange is in flight, oldest
queue first, and changes no bit of the gradients.
"""
import contextlib
import time

import pytest
import torch
import torch.distributed as dist

from dsv3_train.config import ModelConfig
from dsv3_train.model.rope import rope_tables
from dsv3_train.model.transformer import Block
from parallel.expert import apply_expert_parallel
from dsv3_train.precision import DeferredWeightGrads, PrecisionConfig, building_with, defer_weight_grad
from parallel.pipeline.overlap import (Tape, WaitFiller, block_program, interleave, run_forward,
                                       run_in_sequence)
from parallel.pipeline.transport import EmulatedLink, install_exchange
from parallel.testing import run_ranks

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_dense_layers=0, n_heads=2, inter_dim=64,
                  moe_inter_dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                  n_expert_groups=2, n_limited_groups=1, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16, init_std=0.02,
                  balance_loss_alpha=1e-2)
BATCH, SEQ = 2, 8


def _blocks(rank: int, precision=None):
    """Two MoE blocks with experts sharded over the 2 ranks; per-rank inputs."""
    torch.manual_seed(0)
    with building_with(precision):
        blocks = torch.nn.ModuleList(Block(CFG, moe=True) for _ in range(2))
    for block in blocks:
        torch.nn.init.normal_(block.ffn.router.weight, 0.0, 0.5)
        torch.nn.init.normal_(block.ffn.experts.w13, 0.0, 0.1)
        torch.nn.init.normal_(block.ffn.experts.w2, 0.0, 0.1)
    apply_expert_parallel(blocks, dist.group.WORLD)
    gen = torch.Generator().manual_seed(10 + rank)
    inputs = [torch.randn(BATCH, SEQ, CFG.dim, generator=gen) for _ in range(2)]
    grads = [torch.randn(BATCH, SEQ, CFG.dim, generator=gen) for _ in range(2)]
    cos, sin = (table[:SEQ] for table in rope_tables(CFG))
    return blocks, inputs, grads, cos, sin


def _program(blocks, carry, tape, cos, sin):
    for block in blocks:
        yield from block_program(block, carry, tape, cos, sin)


def _forward(blocks, x, cut, cos, sin, tape=None, autocast=contextlib.nullcontext):
    """-> (generator running the forward, carry, tape, input leaf)."""
    x = x.clone().requires_grad_()
    carry, tape = {"h": x}, tape or Tape(cut=cut)
    steps = run_forward(_program(blocks, carry, tape, cos, sin), carry, tape, autocast)
    return steps, carry, tape, x


def _finish(carry, tape):
    tape.finish(carry["h"])
    return tape


def _grads(blocks, x) -> dict:
    out = {name: p.grad.clone() for name, p in blocks.named_parameters()}
    out["input"] = x.grad.clone()
    return out


def _phase_split_worker(rank, world):
    blocks, inputs, grads, cos, sin = _blocks(rank)
    results = {}
    # reference: the plain Block modules, one forward and one backward
    x = inputs[0].clone().requires_grad_()
    h, balances = x, []
    for block in blocks:
        h, balance = block(h, cos, sin)
        balances.append(balance)
    torch.autograd.backward([h, *balances], [grads[0], *[torch.ones(()) for _ in balances]])
    results["plain"] = _grads(blocks, x)
    for cut in (False, True):
        blocks.zero_grad(set_to_none=True)
        steps, carry, tape, x = _forward(blocks, inputs[0], cut, cos, sin)
        run_in_sequence(steps)
        run_in_sequence(_finish(carry, tape).backward_steps(grads[0], 1.0))
        results["cut" if cut else "uncut"] = _grads(blocks, x)
        results[f"segments_{cut}"] = len(tape.segments)
    return results  # run_ranks hands results back by value


def _pair_worker(rank, world):
    """Micro-batch B's forward first, then the pair (A forward, B backward), both ways."""
    blocks, inputs, grads, cos, sin = _blocks(rank)
    link = EmulatedLink()
    install_exchange(blocks, link.exchange)
    events: list[tuple[str, str]] = []
    owner = {"now": None}
    launch = link.exchange

    def logged_exchange(*args, **kwargs):
        work = launch(*args, **kwargs)
        index, who = len(events), owner["now"]
        events.append((who, "launch"))

        class Logged:
            def wait(self):
                events.append((who, f"wait {index}"))
                return work.wait()
        return Logged()

    install_exchange(blocks, logged_exchange)

    def tagged(name, steps):
        while True:
            owner["now"] = name
            try:
                next(steps)
            except StopIteration:
                return
            yield

    results = {}
    for mode in ("sequence", "interleave"):
        blocks.zero_grad(set_to_none=True)
        steps_b, carry_b, tape_b, x_b = _forward(blocks, inputs[1], True, cos, sin)
        run_in_sequence(steps_b)
        _finish(carry_b, tape_b)
        steps_a, carry_a, tape_a, x_a = _forward(blocks, inputs[0], True, cos, sin)
        events.clear()
        pair = (tagged("F", steps_a), tagged("B", tape_b.backward_steps(grads[1], 1.0)))
        (interleave if mode == "interleave" else run_in_sequence)(*pair)
        results[f"events_{mode}"] = list(events)
        run_in_sequence(_finish(carry_a, tape_a).backward_steps(grads[0], 1.0))
        results[mode] = {**_grads(blocks, x_a), "input_b": x_b.grad.clone()}
    return results  # run_ranks hands results back by value


def _filler_worker(rank, world, precision):
    """The pair with B's weight gradients deferred and filled into the waits of a slow link,
    against the same pair with no deferral and an instant link. ``precision`` "fp8-bf16": FP8
    linears with the forward under bf16 autocast (the filler runs GEMMs inside forward phases)."""
    fp8 = precision == "fp8-bf16"
    blocks, inputs, grads, cos, sin = _blocks(rank, PrecisionConfig(linear="fp8") if fp8 else None)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if fp8 else contextlib.nullcontext
    results = {}
    for mode in ("plain", "filled"):
        link = EmulatedLink(latency_s=0.05 if mode == "filled" else 0.0)
        filler = WaitFiller()
        install_exchange(blocks, filler.wrap(link.exchange) if mode == "filled" else link.exchange)
        blocks.zero_grad(set_to_none=True)
        steps_b, carry_b, tape_b, x_b = _forward(blocks, inputs[1], True, cos, sin, autocast=autocast)
        run_in_sequence(steps_b)
        _finish(carry_b, tape_b)
        steps_a, carry_a, tape_a, x_a = _forward(blocks, inputs[0], True, cos, sin, autocast=autocast)
        deferring = defer_weight_grad(blocks) if mode == "filled" else contextlib.nullcontext()

        def backward_b():
            with deferring as pending:
                if pending is not None:
                    filler.add(pending)
                yield from tape_b.backward_steps(grads[1], 1.0)
            if pending is not None:
                pending.compute()
                filler.remove(pending)

        interleave(steps_a, backward_b())
        run_in_sequence(_finish(carry_a, tape_a).backward_steps(grads[0], 1.0))
        results[mode] = {**_grads(blocks, x_a), "input_b": x_b.grad.clone()}
        results[f"filled_{mode}"] = filler.filled
        results[f"exposed_{mode}"] = (link.stats.exposed_s, link.stats.emulated_s)
    return results


def _link_worker(rank, world):
    link = EmulatedLink(latency_s=0.2, bandwidth_bytes_per_s=1e9)
    rows = torch.ones(4, 8)
    timings = {}
    for compute_s in (0.0, 0.3):
        link.stats.reset()
        out = torch.empty_like(rows)
        start = time.perf_counter()
        work = link.exchange(out, rows, [2, 2], [2, 2], group=dist.group.WORLD, async_op=True)
        time.sleep(compute_s)  # what the rank computes meanwhile
        work.wait()
        timings[compute_s] = (time.perf_counter() - start, link.stats.exposed_s, link.stats.emulated_s)
    return timings


@pytest.fixture(scope="module")
def phase_split():
    return run_ranks(_phase_split_worker, 2, timeout=120)


@pytest.fixture(scope="module")
def pair():
    return run_ranks(_pair_worker, 2, timeout=120)


def _rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_phase_split_computes_what_block_forward_and_backward_compute(phase_split):
    for result in phase_split:
        assert result["segments_True"] == 1 + 2 * 2  # two cuts per MoE block
        assert result["segments_False"] == 1
        for name, grad in result["plain"].items():
            assert _rel_err(result["uncut"][name], grad) < 1e-6, name
            assert _rel_err(result["cut"][name], grad) < 1e-6, name


def test_overlapped_pair_equals_forward_then_backward_bit_for_bit(pair):
    for result in pair:
        for name, grad in result["sequence"].items():
            assert torch.equal(result["interleave"][name], grad), name


def test_each_all_to_all_of_the_pair_is_in_flight_while_the_other_micro_batch_computes(pair):
    for result in pair:
        events = result["events_interleave"]
        launches = [i for i, (_, what) in enumerate(events) if what == "launch"]
        assert len(launches) == 2 * 4  # F: 2 blocks x (dispatch, combine); B: the same in reverse
        for index in launches:
            who = events[index][0]
            waited = next(i for i, (_, what) in enumerate(events) if what == f"wait {index}")
            assert any(other != who for other, _ in events[index + 1:waited]), (index, events)
        # without overlap, each micro-batch's exchanges are waited before the other launches any
        sequence = result["events_sequence"]
        owners = [who for who, _ in sequence]
        assert owners == sorted(owners, key=lambda w: w != "F")


def test_emulated_link_waits_for_latency_and_compute_hides_it():
    for timings in run_ranks(_link_worker, 2, timeout=60):
        blocked_s, exposed_s, emulated_s = timings[0.0]
        assert emulated_s == pytest.approx(0.2 + 4 * 8 * 4 / 1e9)
        assert blocked_s >= 0.2 and exposed_s >= 0.19
        total_s, exposed_s, _ = timings[0.3]
        assert total_s >= 0.3 and exposed_s < 0.05


@pytest.mark.parametrize("precision", ["fp32", "fp8-bf16"])
def test_wait_filler_runs_weight_gradients_inside_waits_without_changing_a_bit(precision):
    for result in run_ranks(_filler_worker, 2, precision, timeout=120):
        assert result["filled_plain"] == 0
        assert result["filled_filled"] > 0  # GEMM groups ran while an exchange was in flight
        for name, grad in result["plain"].items():
            assert torch.equal(result["filled"][name], grad), name
        exposed_s, emulated_s = result["exposed_filled"]
        assert exposed_s < emulated_s  # the forward phases and the GEMMs hid part of the link


class _FakeWork:
    def __init__(self, polls_until_done: int, log: list):
        self.left, self.log = polls_until_done, log

    def is_completed(self) -> bool:
        self.left -= 1
        return self.left < 0

    def wait(self) -> bool:
        self.log.append("wait")
        return True


def test_wait_filler_fills_only_while_the_exchange_is_in_flight_oldest_queue_first():
    log: list = []
    filler = WaitFiller()
    empty_now, old, new = DeferredWeightGrads(), DeferredWeightGrads(), DeferredWeightGrads()
    for queue in (empty_now, old, new):
        filler.add(queue)
    for i in range(2):
        old.add(lambda i=i: log.append(f"old {i}"))
        new.add(lambda i=i: log.append(f"new {i}"))
    exchange = filler.wrap(lambda *args, **kwargs: _FakeWork(3, log))
    exchange(None, None, async_op=True).wait()  # in flight for 3 polls: 3 GEMMs, then block
    assert log == ["old 0", "old 1", "new 0", "wait"]
    assert filler.filled == 3
    empty_now.add(lambda: log.append("late"))  # a registered queue that was empty stays registered
    log.clear()
    exchange(None, None, async_op=True).wait()
    assert log == ["late", "new 1", "wait"]
    filler.remove(new)
    new.add(lambda: log.append("removed"))
    log.clear()
    exchange(None, None, async_op=True).wait()
    assert log == ["wait"]
    log.clear()
    assert filler.wrap(lambda *args, **kwargs: _FakeWork(0, log))(None, None) is None  # blocking form
    assert log == ["wait"]


def _comm_stream_worker(rank, world):
    from parallel.pipeline.transport import CommStream

    group = dist.new_group([0], backend="nccl")
    stream = CommStream(torch.device("cuda", 0))
    rows = torch.arange(8.0, device="cuda").view(4, 2)
    out = torch.empty_like(rows)
    stream.exchange(out, rows, [4], [4], group=group, async_op=True).wait()
    return out.cpu().tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_comm_stream_exchange_matches_plain_all_to_all_on_cuda():
    assert run_ranks(_comm_stream_worker, 1, timeout=60)[0] == torch.arange(8.0).view(4, 2).tolist()
