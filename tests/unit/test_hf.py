"""Hugging Face DeepseekV3 checkpoints in and out: logits parity with transformers, strictness.

Reference models are tiny random ``transformers.DeepseekV3ForCausalLM`` (fp32, CPU) with every
weight randomised, router biases large enough to change routing. transformers builds no MTP
module (it ignores layer ``num_hidden_layers`` on load and never saves it), so the tests write the
MTP layer's tensors into the safetensors file themselves, as DeepSeek's checkpoints store them.
"""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # rope_parameters, fused experts: 5.x API
    pytest.skip("these parity tests build models with the transformers 5 API", allow_module_level=True)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from dsv3_train import convert  # noqa: E402
from dsv3_train.checkpoint import save_checkpoint  # noqa: E402
from dsv3_train.config import ModelConfig  # noqa: E402
from dsv3_train.hf import HFFormatError, config_from_hf, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from dsv3_train.model import Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N_LAYERS, VOCAB, SEQ = 3, 128, 24  # SEQ > original_max_position_embeddings (16): YaRN matters
ATOL = RTOL = 1e-5
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
# What transformers reads from a legacy DeepSeek config.json `rope_scaling` without mscale keys:
# cos/sin scaled by 0.1 ln(s) + 1, no softmax rescaling.
YARN_PLAIN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


def hf_config(q_lora_rank=24, groups=(2, 1), rope=None, interleave=True, rope_dim=4, **extra):
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=N_LAYERS, first_k_dense_replace=1, num_attention_heads=2,
                  num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  n_group=groups[0], topk_group=groups[1], kv_lora_rank=16, q_lora_rank=q_lora_rank,
                  qk_nope_head_dim=8, qk_rope_head_dim=rope_dim, v_head_dim=8, max_position_embeddings=64,
                  num_nextn_predict_layers=1, rope_interleave=interleave, routed_scaling_factor=2.5,
                  rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 10000.0}), **extra)
    return DeepseekV3Config(**kwargs)


def random_hf_model(config, seed=0):
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.15)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)  # sigmoid affinities are in (0, 1): this reorders experts
    return model


def mtp_tensors(saved: dict, config, seed=1) -> dict:
    """Layer N = num_hidden_layers as DeepSeek stores MTP module 0: random block + MTP parts."""
    gen = torch.Generator().manual_seed(seed)
    layer, dim = f"model.layers.{N_LAYERS}.", config.hidden_size
    out = {}
    for key, value in saved.items():  # the block: same tensors as the last MoE layer
        if key.startswith(f"model.layers.{N_LAYERS - 1}."):
            new = layer + key[len(f"model.layers.{N_LAYERS - 1}."):]
            out[new] = torch.randn(value.shape, generator=gen) * 0.15
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{layer}{norm}.weight"] = 1 + 0.2 * torch.randn(dim, generator=gen)
    out[layer + "eh_proj.weight"] = torch.randn(dim, 2 * dim, generator=gen) * 0.15
    out[layer + "embed_tokens.weight"] = saved["model.embed_tokens.weight"].clone()
    out[layer + "shared_head.head.weight"] = saved["lm_head.weight"].clone()
    return out


def save_hf(model, path, with_mtp=True, rope_scaling=None):
    """save_pretrained, then add the MTP layer's tensors (and optionally a legacy rope_scaling)."""
    model.save_pretrained(path)
    weights = path / "model.safetensors"
    saved = load_file(str(weights))
    if with_mtp:
        saved.update(mtp_tensors(saved, model.config))
        save_file(saved, str(weights), metadata={"format": "pt"})
    if rope_scaling is not None:
        config = json.loads((path / "config.json").read_text())
        config.pop("rope_parameters")
        config.update(rope_scaling=rope_scaling, rope_theta=10000.0)
        (path / "config.json").write_text(json.dumps(config))
    return saved


def input_ids(seed=0):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(hf_model, ours, ids):
    expected = hf_model(ids).logits
    actual = ours(ids)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """q_lora set, 2 groups keep 1, no YaRN, interleaved rope, MTP stored."""
    path = tmp_path_factory.mktemp("hf_base")
    model = random_hf_model(hf_config())
    saved = save_hf(model, path)
    return path, model, saved


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("q_lora_rank,groups,rope,interleave,rope_dim", [
    (24, (4, 2), YARN, True, 8),
    (None, (4, 2), YARN, False, 8),
    (None, (2, 1), None, False, 4),
], ids=["qlora-g4k2-yarn-interleaved", "noqlora-g4k2-yarn-halfsplit", "noqlora-g2k1-plain-halfsplit"])
def test_logits_match_transformers(tmp_path, q_lora_rank, groups, rope, interleave, rope_dim):
    model = random_hf_model(hf_config(q_lora_rank, groups, rope, interleave, rope_dim), seed=3)
    save_hf(model, tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    assert ours.cfg.q_lora_rank == q_lora_rank and ours.cfg.n_expert_groups == groups[0]
    assert ours.cfg.rope_factor == (4.0 if rope else 1.0) and ours.cfg.mtp_depth == 1
    assert_same_logits(model, ours, input_ids())


def test_logits_match_base_checkpoint(base):
    path, model, _ = base
    assert_same_logits(model, load_hf_checkpoint(path), input_ids(1))


def test_legacy_rope_scaling_without_mscale_matches(tmp_path):
    """DeepSeek's own config.json style: `rope_scaling` with `type`, rope_theta at top level."""
    model = random_hf_model(hf_config(rope=YARN_PLAIN), seed=4)
    save_hf(model, tmp_path, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()  # transformers agrees on the file
    ours = load_hf_checkpoint(tmp_path)
    assert ours.cfg.mscale_all_dim == 0.0  # absent: no softmax rescaling
    assert_same_logits(model, ours, input_ids(2))
    assert_same_logits(reloaded, ours, input_ids(2))


def test_fused_expert_layout_loads(tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj / experts.down_proj) loads too."""
    model = random_hf_model(hf_config(), seed=5)
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert_same_logits(model, load_hf_checkpoint(tmp_path, mtp_depth=0), input_ids(3))


def test_parity_test_has_teeth(base):
    """Zeroing the loaded router biases changes routing and hence the logits beyond tolerance."""
    path, model, _ = base
    ours = load_hf_checkpoint(path)
    ids = input_ids(1)
    with torch.no_grad():
        for block in ours.layers[1:]:
            block.ffn.router.expert_bias.zero_()
        gap = (ours(ids) - model(ids).logits).abs().max().item()
    assert gap > 100 * (ATOL + RTOL * 10)


def test_sharded_checkpoint_with_index(tmp_path, base):
    path, model, saved = base
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    assert_same_logits(model, load_hf_checkpoint(tmp_path), input_ids(4))


# --------------------------------------------------------------------------------- MTP
def test_mtp_module_receives_the_layer_n_tensors(base):
    path, _, saved = base
    ours = load_hf_checkpoint(path).state_dict()
    hf = load_file(str(path / "model.safetensors"))
    layer = f"model.layers.{N_LAYERS}."
    direct = {"enorm.weight": "mtp.0.enorm.weight", "hnorm.weight": "mtp.0.hnorm.weight",
              "eh_proj.weight": "mtp.0.eh_proj.weight", "shared_head.norm.weight": "mtp.0.norm.weight",
              "input_layernorm.weight": "mtp.0.block.attn_norm.weight",
              "post_attention_layernorm.weight": "mtp.0.block.ffn_norm.weight",
              "self_attn.q_a_proj.weight": "mtp.0.block.attn.wq_a.weight",
              "self_attn.q_a_layernorm.weight": "mtp.0.block.attn.q_norm.weight",
              "self_attn.q_b_proj.weight": "mtp.0.block.attn.wq_b.weight",  # interleaved: unchanged
              "self_attn.kv_a_proj_with_mqa.weight": "mtp.0.block.attn.wkv_a.weight",
              "self_attn.kv_a_layernorm.weight": "mtp.0.block.attn.kv_norm.weight",
              "self_attn.kv_b_proj.weight": "mtp.0.block.attn.wkv_b.weight",
              "self_attn.o_proj.weight": "mtp.0.block.attn.wo.weight",
              "mlp.gate.weight": "mtp.0.block.ffn.router.weight",
              "mlp.gate.e_score_correction_bias": "mtp.0.block.ffn.router.expert_bias",
              "mlp.shared_experts.gate_proj.weight": "mtp.0.block.ffn.shared.w1.weight",
              "mlp.shared_experts.up_proj.weight": "mtp.0.block.ffn.shared.w3.weight",
              "mlp.shared_experts.down_proj.weight": "mtp.0.block.ffn.shared.w2.weight"}
    for theirs, mine in direct.items():
        assert torch.equal(ours[mine], hf[layer + theirs]), theirs
    for e in range(8):
        gate_up = torch.cat([hf[f"{layer}mlp.experts.{e}.gate_proj.weight"], hf[f"{layer}mlp.experts.{e}.up_proj.weight"]])
        assert torch.equal(ours["mtp.0.block.ffn.experts.w13"][e], gate_up)
        assert torch.equal(ours["mtp.0.block.ffn.experts.w2"][e], hf[f"{layer}mlp.experts.{e}.down_proj.weight"])
    mtp_keys = [k for k in hf if k.startswith(layer)]
    covered = {layer + k for k in direct} | {layer + "embed_tokens.weight", layer + "shared_head.head.weight"}
    covered |= {k for k in mtp_keys if ".mlp.experts." in k}
    assert set(mtp_keys) == covered  # every layer-N tensor was checked
    assert not torch.equal(ours["mtp.0.block.attn.wo.weight"], ours[f"layers.{N_LAYERS - 1}.attn.wo.weight"])


def test_declared_mtp_without_tensors_needs_explicit_depth(tmp_path):
    model = random_hf_model(hf_config(), seed=6)
    save_hf(model, tmp_path, with_mtp=False)  # what transformers' save_pretrained writes
    with pytest.raises(HFFormatError, match="num_nextn_predict_layers=1.*mtp_depth=0"):
        load_hf_checkpoint(tmp_path)
    ours = load_hf_checkpoint(tmp_path, mtp_depth=0)
    assert len(ours.mtp) == 0
    assert_same_logits(model, ours, input_ids(5))


# -------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("rope_interleave,mscale,mscale_all_dim", [(True, 0.9, 0.7), (False, 1.3, 0.0)])
def test_ours_to_transformers_round_trip(tmp_path, rope_interleave, mscale, mscale_all_dim):
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=3, n_dense_layers=1, n_heads=2, inter_dim=96,
                      moe_inter_dim=32, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
                      n_activated_experts=2, route_scale=2.5, q_lora_rank=24, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64,
                      rope_factor=4.0, original_seq_len=16, mscale=mscale, mscale_all_dim=mscale_all_dim,
                      mtp_depth=1)
    torch.manual_seed(7)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            tensor.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.5 if "expert_bias" in name else 0.15)
    save_hf_checkpoint(ours, tmp_path, rope_interleave=rope_interleave)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.rope_interleave is rope_interleave
    ids = input_ids(6)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=ATOL, rtol=RTOL)
    back = load_hf_checkpoint(tmp_path)
    assert asdict(back.cfg) == {**asdict(cfg), "name": back.cfg.name}
    reference = ours.state_dict()
    for key, value in back.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_convert_cli_both_directions(tmp_path):
    """Training checkpoint -> HF (config from .hydra) -> DCP model state -> HF again: same tensors."""
    from omegaconf import OmegaConf

    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, inter_dim=48, moe_inter_dim=16,
                      q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      max_seq_len=32, mtp_depth=1)
    torch.manual_seed(8)
    model = Transformer(cfg)
    with torch.no_grad():
        for block in list(model.layers[1:]) + [model.mtp[0].block]:
            block.ffn.router.expert_bias.normal_(0, 0.5)
    run = tmp_path / "runs" / "toy"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"model": asdict(cfg), "name": "toy"}))
    step = save_checkpoint(run / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()), {"step": 1})
    convert.main(["--to-hf", str(step), str(tmp_path / "hf")])
    dcp_dir, hf_again = tmp_path / "dcp", tmp_path / "hf2"
    convert.main(["--from-hf", str(tmp_path / "hf"), str(dcp_dir)])
    convert.main(["--to-hf", str(dcp_dir), str(hf_again)])
    first, second = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(hf_again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    ids = input_ids(7)[:, :16] % VOCAB
    with torch.no_grad():
        expected = model.eval()(ids)
        torch.testing.assert_close(load_hf_checkpoint(tmp_path / "hf")(ids), expected, atol=0, rtol=0)
        torch.testing.assert_close(convert.load_dcp_model(dcp_dir)(ids), expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------ errors
def _raw_config(**changes):
    raw = hf_config().to_dict()
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes,match", [
    ({"scoring_func": "softmax"}, r"scoring_func='softmax'.*sigmoid"),
    ({"topk_method": "greedy"}, r"topk_method='greedy'.*noaux_tc"),
    ({"tie_word_embeddings": True}, r"tie_word_embeddings=True"),
    ({"num_key_value_heads": 1}, r"num_key_value_heads=1.*num_attention_heads"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"rms_norm_eps": 1e-5}, r"rms_norm_eps=1e-05"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, r"rope_type='linear'"),
    ({"quantization_config": {"quant_method": "fp8"}}, r"quantization_config"),
    ({"some_new_switch": 3}, r"some_new_switch"),
])
def test_unsupported_config_values_are_refused(changes, match):
    with pytest.raises(HFFormatError, match=match):
        config_from_hf(_raw_config(**changes))


def test_config_maps_every_field():
    cfg, layout = config_from_hf(_raw_config(rope_parameters=YARN, rope_interleave=False, q_lora_rank=None))
    assert (cfg.dim, cfg.n_layers, cfg.n_dense_layers, cfg.n_heads, cfg.inter_dim, cfg.moe_inter_dim) == (64, 3, 1, 2, 96, 32)
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.n_activated_experts) == (8, 1, 2)
    assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale, cfg.norm_topk_prob) == (2, 1, 2.5, True)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (None, 16, 8, 4, 8)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps, cfg.mtp_depth) == (VOCAB, 64, 1e4, 1e-6, 1)
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow) == (4.0, 16, 32.0, 1.0)
    assert (cfg.mscale, cfg.mscale_all_dim) == (1.0, 0.8)
    assert layout.rope_interleave is False


def test_leftover_and_missing_tensors_are_errors(tmp_path, base):
    path, _, _ = base
    tensors = load_file(str(path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    extra = dict(tensors, **{"model.layers.0.mlp.bogus.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match="model.layers.0.mlp.bogus.weight was not consumed"):
        load_hf_checkpoint(tmp_path)
    fewer = {k: v for k, v in tensors.items() if k != "model.layers.2.mlp.experts.3.up_proj.weight"}
    save_file(fewer, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match="model.layers.2.mlp.experts.3.up_proj.weight is missing"):
        load_hf_checkpoint(tmp_path)
    other_head = dict(tensors, **{f"model.layers.{N_LAYERS}.shared_head.head.weight": torch.zeros(VOCAB, 64)})
    save_file(other_head, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match="shared_head.head.weight differs"):
        load_hf_checkpoint(tmp_path)


# DeepSeek-V3's config.json on the Hub (weights there are FP8 with block scales).
HUB_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_hub_v3_config_maps_onto_our_v3_preset():
    with pytest.raises(HFFormatError, match="quantization_config.*dequantise"):
        config_from_hf(HUB_V3_CONFIG)
    dequantised = {k: v for k, v in HUB_V3_CONFIG.items() if k != "quantization_config"}
    cfg, layout = config_from_hf(dequantised)
    preset = convert.model_config_from_yaml(REPO / "configs" / "model" / "v3-671b.yaml")
    differ = {k for k, v in asdict(cfg).items() if asdict(preset)[k] != v}
    assert differ == {"name", "balance_loss_alpha", "init_std"}  # training-only knobs
    assert layout.rope_interleave is True and layout.mtp_layers == 1


def test_dtype_on_load_and_save(tmp_path, base):
    path, model, _ = base
    ours = load_hf_checkpoint(path, dtype=torch.bfloat16)
    assert ours.embed.weight.dtype == torch.bfloat16 and ours.layers[1].attn.wkv_a.weight.dtype == torch.bfloat16
    router = ours.layers[1].ffn.router
    assert router.weight.dtype == router.expert_bias.dtype == torch.float32  # as in transformers
    with torch.no_grad():
        assert torch.isfinite(ours(input_ids()).float()).all()
    save_hf_checkpoint(ours, tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
    assert saved["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
