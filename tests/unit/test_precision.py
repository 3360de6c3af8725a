"""Block-wise FP8 quantisation and the precision factory, against computations written here.

Error bound of the emulated FP8 GEMM (DeepSeek-V3 recipe). E4M3 keeps 3 mantissa bits, so rounding
a scaled value v to nearest has |Q(v) - v| <= 2^-4 |v| (u = 2^-4) when |v| >= 2^-6 (normal), and
<= 2^-10 below it (subnormal spacing 2^-9). With v = x / s, per element
    |x^ - x| <= d(x) = 2^-4 |x| + 2^-10 s          (s: the element's tile or block scale)
and for y = sum_k x_k w_k,
    |y^ - y| <= sum_k d(x_k) (|w_k| + d(w_k)) + |x_k| d(w_k)  ~=  (2u + u^2) sum_k |x_k||w_k| + subnormal terms,
plus fp32 accumulation (K 2^-24 sum_k |x^_k||w^_k|). The tests check every output element of
the forward, input-gradient and weight-gradient GEMMs against this bound, computed in fp64.
"""
import pytest
import torch
import torch.nn.functional as F

from dsv3_train.config import ConfigError, ModelConfig
from dsv3_train.model import Transformer
from dsv3_train.model.moe import GroupedExperts
from dsv3_train.precision import (E4M3_MAX, Linear, PrecisionConfig, defer_weight_grad, dequantize_blocks,
                                  dequantize_tiles, keep_moments_in_bf16, make_linear, quantize_blocks,
                                  quantize_tiles, to_e4m3)
from dsv3_train.precision.quantize import fake_quantize_blocks, fake_quantize_tiles, round_to_e4m3

FP8 = PrecisionConfig(linear="fp8")
U = 2.0 ** -4  # unit roundoff of E4M3 (3 mantissa bits)


def _wide_range(*shape, seed=0):
    """Normal values times 10^[-3, 1]: tiles whose small entries land in E4M3's subnormals."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 10 ** (4 * torch.rand(*shape, generator=g) - 3)


def _tile_scales_by_loop(x, tile=128):
    rows, cols = x.shape
    scales = torch.empty(rows, -(-cols // tile))
    for r in range(rows):
        for t in range(scales.shape[1]):
            amax = x[r, t * tile:(t + 1) * tile].abs().max().item()
            scales[r, t] = amax / 448.0 if amax > 0 else 1.0
    return scales


def _scale_per_element(x, tile=128):
    """Each element's 1 x tile scale (fp64), tiles along the last dim."""
    return _tile_scales_by_loop(x.float(), tile).double().repeat_interleave(tile, dim=1)[:, :x.shape[1]]


def _block_scale_per_element(w, block=128):
    n, k = w.shape
    scale = torch.empty(n, k)  # fp32, as the scales are stored
    for i in range(0, n, block):
        for j in range(0, k, block):
            amax = w[i:i + block, j:j + block].abs().max().item()
            scale[i:i + block, j:j + block] = amax / 448.0 if amax > 0 else 1.0
    return scale.double()


def _rounding_bound(t, scale):
    """d(t) = 2^-4 |t| + 2^-10 s, elementwise, fp64."""
    return U * t.double().abs() + 2.0 ** -10 * scale


def _gemm_bound(a, da, b, db):
    """Bound on |A^ B^T - A B^T| for operands a (M, K), b (N, K) with rounding bounds da, db."""
    k = a.shape[1]
    a, b = a.double().abs(), b.double().abs()
    accumulation = k * 2.0 ** -24 * ((a + da) @ (b + db).T)
    return da @ (b + db).T + a @ db.T + accumulation


# ---------------------------------------------------------------- quantisation
def test_tile_scales_are_max_abs_over_448_per_1x128_tile_including_the_partial_last_tile():
    x = _wide_range(5, 300)  # 300 = 2 * 128 + 44
    q, scales = quantize_tiles(x)
    want = _tile_scales_by_loop(x)
    assert scales.shape == (5, 3) and torch.equal(scales, want)
    expected_q = (x / want.repeat_interleave(128, dim=1)[:, :300]).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


def test_block_scales_are_max_abs_over_448_per_128x128_block():
    w = _wide_range(200, 300, seed=1)
    q, scales = quantize_blocks(w)
    assert scales.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert scales[i, j] == torch.tensor(block.abs().max().item() / 448.0, dtype=torch.float32)
    expected_q = (w.double() / _block_scale_per_element(w)).float().to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


def test_stacked_expert_weights_get_blocks_per_expert():
    w = _wide_range(3, 130, 64, seed=2)
    q, scales = quantize_blocks(w)
    assert scales.shape == (3, 2, 1)
    for e in range(3):
        q_e, s_e = quantize_blocks(w[e])
        assert torch.equal(scales[e], s_e) and torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8))


def test_all_zero_tile_has_scale_one_and_zero_values():
    x = torch.zeros(2, 256)
    x[1, 128:] = torch.randn(128)
    q, scales = quantize_tiles(x)
    assert scales[0].tolist() == [1.0, 1.0] and scales[1, 0].item() == 1.0
    assert q[0].float().abs().sum() == 0 and not torch.isnan(q.float()).any()


def test_e4m3_cast_saturates_at_448_instead_of_overflowing():
    values = torch.tensor([500.0, -1e6, 448.0, 464.0, 479.0, -449.0])
    assert to_e4m3(values).float().tolist() == [448.0, -448.0, 448.0, 448.0, 448.0, -448.0]
    q, _ = quantize_tiles(_wide_range(4, 256))
    assert q.float().abs().amax(-1).eq(E4M3_MAX).all()  # every tile's max lands on 448


def test_fp32_rounding_to_e4m3_equals_the_cast_at_every_midpoint_and_fake_quantisation_equals_round_trip():
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    midpoints = (grid[1:] + grid[:-1]) / 2
    probes = torch.cat([midpoints, midpoints.nextafter(grid[1:]), midpoints.nextafter(grid[:-1]), grid,
                        _wide_range(100_000), torch.tensor([500.0, -1e6, 1e-30])])
    assert torch.equal(round_to_e4m3(probes), to_e4m3(probes).float())
    x, w = _wide_range(7, 300, seed=8), _wide_range(2, 130, 260, seed=9)
    assert torch.equal(fake_quantize_tiles(x), dequantize_tiles(*quantize_tiles(x)))
    assert torch.equal(fake_quantize_blocks(w), dequantize_blocks(*quantize_blocks(w)))


def test_round_trip_error_is_within_half_an_e4m3_ulp():
    x = _wide_range(64, 384, seed=3)
    q, scales = quantize_tiles(x)
    error = (dequantize_tiles(q, scales) - x).double().abs()
    bound = _rounding_bound(x, _scale_per_element(x))
    assert (error <= bound * (1 + 2 ** -20)).all()
    assert (error / bound).max() > 0.9  # the bound is attained: it is the real rounding step
    relative = error.norm() / x.double().norm()
    assert 2 ** -8 < relative < U

    w = _wide_range(200, 300, seed=4)
    qw, sw = quantize_blocks(w)
    error = (dequantize_blocks(qw, sw) - w).double().abs()
    assert (error <= _rounding_bound(w, _block_scale_per_element(w)) * (1 + 2 ** -20)).all()


def test_power_of_two_scales_are_the_next_power_of_two_and_dequantise_exactly():
    x = _wide_range(8, 256, seed=5)
    q, scales = quantize_tiles(x, power_of_two=True)
    exact = _tile_scales_by_loop(x)
    assert torch.equal(scales, torch.exp2(torch.ceil(torch.log2(exact))))
    assert torch.equal(dequantize_tiles(q, scales).double(), q.double() * scales.double().repeat_interleave(128, 1))


# ---------------------------------------------------------------- emulated FP8 GEMMs
def _fp8_linear_run(m, k, n, seed=0):
    x = _wide_range(m, k, seed=seed).requires_grad_(True)
    linear = Linear(k, n, precision=FP8)
    with torch.no_grad():
        linear.weight.copy_(_wide_range(n, k, seed=seed + 1) * 0.1)
    grad = _wide_range(m, n, seed=seed + 2)
    y = linear(x)
    y.backward(grad)
    return x.detach(), linear.weight.detach(), grad, y.detach(), x.grad, linear.weight.grad


@pytest.mark.parametrize("m,k,n", [(64, 384, 200), (37, 100, 70)])  # also shapes that are not 128-multiples
def test_emulated_fp8_gemms_stay_within_the_recipe_error_bound(m, k, n):
    x, w, grad, y, grad_x, grad_w = _fp8_linear_run(m, k, n)
    d_w = _rounding_bound(w, _block_scale_per_element(w))
    # forward: x tiled along K, w in blocks
    d_x = _rounding_bound(x, _scale_per_element(x))
    assert ((y.double() - x.double() @ w.double().T).abs() <= _gemm_bound(x, d_x, w, d_w)).all()
    # input gradient: dy tiled along N, the same weight blocks (transposed)
    d_g = _rounding_bound(grad, _scale_per_element(grad))
    assert ((grad_x.double() - grad.double() @ w.double()).abs()
            <= _gemm_bound(grad, d_g, w.T, d_w.T)).all()
    # weight gradient: dy and x both tiled along the tokens (128 x 1 tiles)
    d_gt = _rounding_bound(grad.T, _scale_per_element(grad.T))
    d_xt = _rounding_bound(x.T, _scale_per_element(x.T))
    assert ((grad_w.double() - grad.double().T @ x.double()).abs()
            <= _gemm_bound(grad.T, d_gt, x.T, d_xt)).all()
    # and the rounding really happened: errors are FP8-sized, not fp32-sized
    relative = (y.double() - x.double() @ w.double().T).norm() / (x.double() @ w.double().T).norm()
    assert 2 ** -9 < relative < 2 * U


def test_emulated_fp8_forward_equals_per_block_scaled_products_promoted_every_128():
    """V3's GEMM: y = sum over K-groups of (q_x . q_w) * s_x * s_w, accumulated in fp32."""
    x, w = _wide_range(16, 320, seed=6), _wide_range(40, 320, seed=7)
    linear = Linear(320, 40, precision=FP8)
    with torch.no_grad():
        linear.weight.copy_(w)
        y = linear(x)
    s_x, s_w = _scale_per_element(x), _block_scale_per_element(w)
    q_x = (x.double() / s_x).float().to(torch.float8_e4m3fn).double()
    q_w = (w.double() / s_w).float().to(torch.float8_e4m3fn).double()
    want = torch.zeros(16, 40, dtype=torch.float64)
    for start in range(0, 320, 128):
        group = slice(start, start + 128)
        want += (q_x[:, group] @ q_w[:, group].T) * s_x[:, start:start + 1] * s_w[:, start].unsqueeze(0)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


# ---------------------------------------------------------------- the factory
def test_fp32_linear_is_nn_linear_bit_for_bit_with_and_without_autocast():
    torch.manual_seed(0)
    ours, ref = Linear(96, 80), torch.nn.Linear(96, 80, bias=False)
    ref.weight.data.copy_(ours.weight.data)
    x = torch.randn(4, 33, 96)
    for autocast in (False, True):
        results = []
        for module in (ours, ref):
            xi = x.clone().requires_grad_(True)
            module.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(xi)
            y.float().square().sum().backward()
            results.append((y, xi.grad, module.weight.grad))
        for got, want in zip(*results):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_bf16_linear_runs_bf16_gemms_on_fp32_master_weights():
    torch.manual_seed(0)
    linear = Linear(64, 48, precision=PrecisionConfig(linear="bf16"))
    x = torch.randn(10, 64, requires_grad=True)
    y = linear(x)
    assert y.dtype == torch.float32 and linear.weight.dtype == torch.float32
    torch.testing.assert_close(y, (x.bfloat16() @ linear.weight.bfloat16().T).float(), rtol=0, atol=0)
    y.sum().backward()
    assert linear.weight.grad.dtype == torch.float32
    assert torch.equal(linear.weight.grad, torch.ones(10, 48).bfloat16().T.mm(x.detach().bfloat16()).float())


def test_model_precision_reaches_every_projection_and_expert_but_not_embedding_head_or_router():
    cfg = ModelConfig(vocab_size=300, dim=32, n_heads=2, inter_dim=64, moe_inter_dim=16, kv_lora_rank=8,
                      q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32)
    model = Transformer(cfg, FP8)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    # 3 blocks + MTP's: wq_a, wq_b, wkv_a, wkv_b, wo and 3 dense or shared-expert FFN linears, + eh_proj
    assert len(linears) == 4 * (5 + 3) + 1 and len(experts) == 3
    assert all(m.precision.fp8 for m in linears + experts)
    assert type(model.head) is torch.nn.Linear and type(model.embed) is torch.nn.Embedding
    assert all(not isinstance(m, Linear) for m in model.modules() if "router" in type(m).__name__.lower())
    default = Transformer(cfg)
    assert all(m.precision.linear == "fp32" for m in default.modules() if isinstance(m, (Linear, GroupedExperts)))


def test_te_backend_without_cuda_or_transformer_engine_is_a_one_line_error_with_the_install_hint():
    te = PrecisionConfig(linear="fp8", fp8_backend="te")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the te backend may be usable here")
    with pytest.raises(ConfigError) as error:
        make_linear(16, 16, precision=te)
    message = str(error.value)
    assert "\n" not in message and 'pip install -e ".[gpu]"' in message and "te" in message


@pytest.mark.parametrize("field,value,words", [("linear", "fp16", "'fp16'"), ("fp8_backend", "cuda", "'cuda'"),
                                              ("tile", 100, "(100)")])
def test_precision_config_names_the_bad_value_and_the_choices(field, value, words):
    with pytest.raises(ConfigError) as error:
        PrecisionConfig(**{field: value})
    assert words in str(error.value) and f"precision.{field}" in str(error.value)


# ---------------------------------------------------------------- deferred weight gradients
PRECISIONS = [PrecisionConfig(), PrecisionConfig(linear="bf16"), FP8]


def _backward_grads(module, run, defer):
    module.zero_grad(set_to_none=True)
    if not defer:
        run().backward()
    else:
        with defer_weight_grad(module) as pending:
            run().backward()
        assert len(pending) > 0
        factory_weights = [p for m in module.modules() if isinstance(m, (Linear, GroupedExperts))
                           for p in m.parameters(recurse=False)]
        assert factory_weights and all(p.grad is None for p in factory_weights)  # W not run yet
        pending.compute()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.linear)
def test_deferred_linear_weight_grads_equal_immediate_ones(precision):
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(40, 130, precision=precision), torch.nn.GELU(),
                                Linear(130, 24, precision=precision))
    x = torch.randn(3, 50, 40, requires_grad=True)
    run = lambda: model(x).square().mean()  # noqa: E731
    immediate, deferred = _backward_grads(model, run, False), _backward_grads(model, run, True)
    assert immediate.keys() == deferred.keys() == {"0.weight", "2.weight"}
    for name in immediate:
        assert torch.equal(immediate[name], deferred[name]), name


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.linear)
@pytest.mark.parametrize("autocast", [False, True])
def test_deferred_grouped_expert_weight_grads_equal_immediate_ones(precision, autocast):
    torch.manual_seed(0)
    experts = GroupedExperts(5, 24, 20, precision=precision)
    torch.nn.init.normal_(experts.w13, 0, 0.2)
    torch.nn.init.normal_(experts.w2, 0, 0.2)
    counts = [7, 0, 12, 3, 9]  # an idle expert, uneven partial tiles
    x = torch.randn(sum(counts), 24, requires_grad=True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return experts(x, counts).float().square().mean()

    immediate, deferred = _backward_grads(experts, run, False), _backward_grads(experts, run, True)
    assert immediate.keys() == deferred.keys() == {"w13", "w2"}
    for name in immediate:
        assert torch.equal(immediate[name], deferred[name]), name
    assert immediate["w13"][1].abs().sum() == 0  # the idle expert


def test_deferred_weight_grads_of_a_whole_fp8_model_equal_immediate_ones_and_accumulate():
    cfg = ModelConfig(vocab_size=300, dim=32, n_heads=2, inter_dim=64, moe_inter_dim=16, kv_lora_rank=8,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg, FP8)
    tokens = torch.randint(0, 300, (2, 17))
    run = lambda: model.loss(tokens, 0.3).total  # noqa: E731
    immediate = _backward_grads(model, run, False)
    deferred = _backward_grads(model, run, True)
    assert immediate.keys() == deferred.keys()
    for name in immediate:
        assert torch.equal(immediate[name], deferred[name]), name
    # a second micro-batch's deferred W adds to the gradients already there, as autograd would
    with defer_weight_grad(model) as pending:
        run().backward()
    pending.compute()
    for name, p in model.named_parameters():
        if name in immediate:
            torch.testing.assert_close(p.grad, 2 * immediate[name])


def test_fp8_grouped_experts_equal_experts_made_of_three_fp8_linears():
    """Per expert: w2(silu(w1 x) * w3 x) with w1, w3, w2 separate FP8 linears (gate and up blocks
    apart, each GEMM's tiles over that expert's rows only)."""
    torch.manual_seed(0)
    n_experts, dim, hidden, counts = 3, 136, 72, [5, 0, 140]
    experts = GroupedExperts(n_experts, dim, hidden, precision=FP8)
    torch.nn.init.normal_(experts.w13, 0, 0.1)
    torch.nn.init.normal_(experts.w2, 0, 0.1)
    x = torch.randn(sum(counts), dim)
    grad = torch.randn(sum(counts), dim)
    xi = x.clone().requires_grad_(True)
    experts(xi, counts).backward(grad)

    want_out, want_grad_x = [], []
    for expert, rows in enumerate(x.split(counts)):
        if rows.shape[0] == 0:
            continue
        w1, w3, w2 = (Linear(dim, hidden, precision=FP8), Linear(dim, hidden, precision=FP8),
                      Linear(hidden, dim, precision=FP8))
        with torch.no_grad():
            w1.weight.copy_(experts.w13[expert, :hidden])
            w3.weight.copy_(experts.w13[expert, hidden:])
            w2.weight.copy_(experts.w2[expert])
        ri = rows.clone().requires_grad_(True)
        out = w2(F.silu(w1(ri)) * w3(ri))
        out.backward(grad[sum(counts[:expert]):sum(counts[:expert + 1])])
        want_out.append(out.detach())
        want_grad_x.append(ri.grad)
        close = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(experts.w13.grad[expert], torch.cat([w1.weight.grad, w3.weight.grad]), **close)
        torch.testing.assert_close(experts.w2.grad[expert], w2.weight.grad, **close)
    torch.testing.assert_close(experts(x, counts).detach(), torch.cat(want_out), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xi.grad, torch.cat(want_grad_x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- optimizer moments
def test_bf16_moments_follow_adamw_with_moments_rounded_to_bf16_after_every_step():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 5))
    optimizer = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    keep_moments_in_bf16(optimizer)
    ref = param.detach().clone()
    m = torch.zeros_like(ref, dtype=torch.bfloat16)
    v = torch.zeros_like(ref, dtype=torch.bfloat16)
    for step in range(1, 6):
        grad = torch.randn(6, 5)
        param.grad = grad.clone()
        optimizer.step()
        # AdamW written out, moments widened, updated in fp32, then stored in bf16
        ref.mul_(1 - 1e-2 * 0.1)
        m32 = m.float().lerp(grad, 1 - 0.9)
        v32 = v.float().mul(0.95).addcmul(grad, grad, value=1 - 0.95)
        denom = (v32.sqrt() / (1 - 0.95 ** step) ** 0.5).add_(1e-8)
        ref.addcdiv_(m32, denom, value=-1e-2 / (1 - 0.9 ** step))
        m, v = m32.bfloat16(), v32.bfloat16()
        state = optimizer.state[param]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)
        torch.testing.assert_close(param.detach(), ref, rtol=1e-6, atol=1e-7)
