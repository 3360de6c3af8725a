"""Decoding: the latent KV cache with absorbed attention against full recomputation, sampling,
stop tokens, ragged batches, MTP speculative decoding and the dsv3-generate command line.

Every reference is computed independently of dsv3_train.generate: full-sequence ``model(ids)``
(the naive MLA path), a hand-written greedy loop, a brute-force nucleus, the MTP module's
training-time forward.
"""
import pytest
import torch

from dsv3_train import generate as gen
from dsv3_train.config import ModelConfig
from dsv3_train.convert import save_dcp_model
from dsv3_train.data.tokenizer import MIN_VOCAB_SIZE, eos_id, train_tokenizer
from dsv3_train.hf import save_hf_checkpoint
from dsv3_train.model import Transformer

VOCAB = 64
ATOL = RTOL = 1e-5
PROMPTS = [[5, 17, 3], [9, 2, 44, 8, 30, 12, 7, 21, 1], [60, 33, 4, 4, 18, 50]]  # ragged


def tiny(q_lora_rank=None, yarn=False, mtp_depth=1, seed=0, vocab=VOCAB) -> Transformer:
    """3 blocks (1 dense, 2 MoE with group-limited routing and random router biases), fp32."""
    yarn_fields = dict(rope_factor=4.0, original_seq_len=16, mscale=1.0, mscale_all_dim=0.8) if yarn else {}
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=3, n_dense_layers=1, n_heads=2, inter_dim=64,
                      moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_expert_groups=2,
                      n_limited_groups=1, q_lora_rank=q_lora_rank, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=6, max_seq_len=48, mtp_depth=mtp_depth,
                      init_std=0.2, **yarn_fields)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.normal_(0, 0.5)  # selection differs from the unbiased top-k
    return model


@torch.no_grad()
def reference_greedy(model, prompt, n_tokens):
    """Greedy decoding by recomputing the whole sequence with model(ids) at every step."""
    ids = list(prompt)
    for _ in range(n_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ------------------------------------------------------------------------------ cached decoding
@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "expanded"])
@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q_direct", "q_lora"])
@torch.no_grad()
def test_cached_logits_equal_full_recomputation_at_every_step(q_lora_rank, yarn, absorb):
    model = tiny(q_lora_rank, yarn)
    ids = torch.randint(0, VOCAB, (2, 28), generator=torch.Generator().manual_seed(1))
    full = model(ids)  # (2, 28, V): the naive MLA path over the whole sequence
    decoder = gen.Decoder(model, batch=2, capacity=28, absorb=absorb)
    prefill = decoder.logits(decoder.prefill(ids[:, :6].tolist()))
    torch.testing.assert_close(prefill, full[:, :6], atol=ATOL, rtol=RTOL)
    for t in range(6, 26):  # one token per step, positions past original_seq_len (16) too
        step = decoder.logits(decoder.extend(ids[:, t:t + 1]))
        torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=RTOL)
    two = decoder.logits(decoder.extend(ids[:, 26:28]))  # a chunk, as speculative verification runs
    torch.testing.assert_close(two, full[:, 26:28], atol=ATOL, rtol=RTOL)


def test_cache_stores_only_latent_and_rope_key_per_token_per_layer():
    model = tiny(yarn=True)
    cfg = model.cfg
    cache = gen.Decoder(model, batch=3, capacity=20).stack.cache
    assert isinstance(cache, gen.LatentKVCache)
    assert sorted(vars(cache)) == ["latent", "rope_key"]
    assert [tuple(t.shape) for t in cache.latent] == [(3, 20, cfg.kv_lora_rank)] * cfg.n_layers
    assert [tuple(t.shape) for t in cache.rope_key] == [(3, 20, cfg.qk_rope_head_dim)] * cfg.n_layers
    assert sum(t.nbytes for t in cache.tensors()) == 3 * 20 * (8 + 4) * 3 * 4
    assert gen.cache_bytes_per_token(cache) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * 4
    expanded = gen.Decoder(model, batch=3, capacity=20, absorb=False).stack.cache
    per_head = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert gen.cache_bytes_per_token(expanded) == per_head * cfg.n_layers * 4


@torch.no_grad()
def test_absorbed_decoding_never_expands_keys_or_values(monkeypatch):
    model = tiny(q_lora_rank=12)
    for block in model.layers:
        monkeypatch.setattr(block.attn, "expand_kv", lambda c_kv: pytest.fail("expand_kv called"))
    decoder = gen.Decoder(model, batch=1, capacity=8)
    decoder.prefill([[1, 2, 3]])
    decoder.extend(torch.tensor([[4]]))


def test_absorbed_attention_equals_attention_over_expanded_heads():
    """One layer, random latents: absorption is an exact re-association of the naive product."""
    attn = tiny().layers[0].attn
    gen_ = torch.Generator().manual_seed(3)
    q_nope, q_rope = torch.randn(2, 3, 2, 8, generator=gen_), torch.randn(2, 3, 2, 4, generator=gen_)
    latent, rope_key = torch.randn(2, 5, 8, generator=gen_), torch.randn(2, 5, 4, generator=gen_)
    mask = torch.rand(2, 3, 5, generator=gen_) > 0.3
    mask[..., 0] = True
    k_nope, v = attn.wkv_b(latent).unflatten(-1, (2, 14)).split([8, 6], dim=-1)  # (2, 5, H, *)
    scores = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
              + torch.einsum("bthd,bsd->bhts", q_rope, rope_key)) * attn.softmax_scale
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    expected = attn.wo(torch.einsum("bhts,bshd->bthd", probs, v).flatten(2))
    actual = gen.absorbed_attention(attn, q_nope, q_rope, latent, rope_key, mask)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------ generate
def test_greedy_equals_argmax_of_full_recomputation():
    model = tiny(q_lora_rank=12, yarn=True)
    assert gen.generate(model, PROMPTS[:1], 12) == [reference_greedy(model, PROMPTS[0], 12)]


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "expanded"])
def test_ragged_batch_decodes_like_each_prompt_alone(absorb):
    model = tiny(yarn=True)
    alone = [gen.generate(model, [prompt], 15, absorb=absorb)[0] for prompt in PROMPTS]
    assert gen.generate(model, PROMPTS, 15, absorb=absorb) == alone
    assert alone[0] == reference_greedy(model, PROMPTS[0], 15)


def test_stop_token_ends_only_its_own_sequence():
    model = tiny()
    free = gen.generate(model, PROMPTS, 12)
    stop = free[1][4]
    expected = [out[:out.index(stop)] if stop in out else out for out in free]
    assert gen.generate(model, PROMPTS, 12, stop_tokens=[stop]) == expected
    assert len(expected[1]) < 12


def test_generate_restores_training_mode_and_leaves_router_loads_alone():
    model = tiny().train()
    gen.generate(model, PROMPTS, 4)
    assert model.training
    assert all(float(block.ffn.router.expert_load.sum()) == 0 for block in model.layers[1:])


# ------------------------------------------------------------------------------ sampling
def test_top_k_1_sampling_is_greedy():
    model = tiny()
    sampled = gen.generate(model, PROMPTS, 10, temperature=1.5, top_k=1,
                           generator=torch.Generator().manual_seed(0))
    assert sampled == gen.generate(model, PROMPTS, 10)


def nucleus(probs, top_p):
    """Brute force: the smallest set of most likely tokens whose probability reaches top_p."""
    kept, mass = set(), 0.0
    for prob, token in sorted(((p, i) for i, p in enumerate(probs)), reverse=True):
        if mass >= top_p:
            break
        kept.add(token)
        mass += prob
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(5)) * 2
    filtered = gen.filter_logits(logits, top_p=top_p)
    for row in range(4):
        kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
        assert kept == nucleus(logits[row].double().softmax(-1).tolist(), top_p)
        assert torch.equal(filtered[row][list(kept)], logits[row][list(kept)])


def test_top_p_on_known_probabilities():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda p: torch.isfinite(gen.filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist()
    assert kept(0.5) == [1]
    assert kept(0.7) == [1, 3]
    assert kept(0.9) == [1, 2, 3]
    assert kept(0.97) == [0, 1, 2, 3]


def test_sampling_draws_only_kept_tokens_in_proportion():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(20000, -1)
    draws = gen.sample_next(logits, temperature=1.0, top_k=3, top_p=0.7,
                            generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(counts, torch.tensor([0, 0.5 / 0.8, 0, 0.3 / 0.8], dtype=torch.double),
                               atol=0.015, rtol=0)


def test_seeded_sampling_is_reproducible():
    model = tiny()

    def sample(seed):
        return gen.generate(model, PROMPTS, 10, temperature=1.0, top_p=0.9, top_k=20,
                            generator=torch.Generator().manual_seed(seed))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=0.0), r"top_p \(0.0\) must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p \(1.5\) must be in \(0, 1\]"),
    (dict(top_k=0), r"top_k \(0\) must be >= 1"),
    (dict(temperature=-1.0), r"temperature \(-1.0\) must be >= 0"),
    (dict(max_new_tokens=0), r"max_new_tokens \(0\) must be >= 1"),
    (dict(max_new_tokens=45), r"longest prompt \(9\) \+ max_new_tokens \(45\) exceeds model.max_seq_len \(48\)"),
])
def test_bad_arguments_name_the_value_and_the_fix(kwargs, message):
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        gen.generate(tiny(), PROMPTS, **args)


# ------------------------------------------------------------------------------ speculative
@torch.no_grad()
def test_drafter_equals_the_mtp_module_over_the_full_sequence():
    """At every position, the cached drafter's draft is the argmax of the MTP module's
    training-time forward (h_i with Emb(t_{i+1}) predicts t_{i+2})."""
    model = tiny(q_lora_rank=12, yarn=True)
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    h, _ = model.forward_hidden(tokens)
    module = model.mtp[0]
    cos, sin = model.rope(23)
    h_mtp, _ = module(h[:, :23], model.embed(tokens[:, 1:]), cos, sin)
    expected = model.head(module.norm(h_mtp)).argmax(-1)[0].tolist()  # (23,)
    drafter = gen.MTPDrafter(model, capacity=24)
    drafts = [drafter(h[:, :5], tokens[0, 1:6].tolist())]
    drafts += [drafter(h[:, i:i + 1], [int(tokens[0, i + 1])]) for i in range(5, 23)]
    assert drafts == expected[4:]


class ScriptedDrafter:
    """Drafts the true greedy token (from a reference run), wrong on every `wrong_every`-th call."""

    def __init__(self, reference, wrong_every):
        self.reference, self.wrong_every, self.length, self.calls = reference, wrong_every, 0, 0

    def __call__(self, hidden, next_tokens):
        self.length += len(next_tokens)  # the last position fed is length-1: draft t_{length+1}
        self.calls += 1
        true = self.reference[self.length + 1]
        return (true + 1) % VOCAB if self.wrong_every and self.calls % self.wrong_every == 0 else true


@pytest.mark.parametrize("wrong_every,rate", [(0, 1.0), (1, 0.0), (3, None)],
                         ids=["all_accepted", "all_rejected", "mixed"])
def test_speculative_output_is_greedy_output_whatever_the_drafts(monkeypatch, wrong_every, rate):
    model = tiny(q_lora_rank=12, yarn=True)
    prompt = PROMPTS[1]
    reference = prompt + reference_greedy(model, prompt, 20)
    monkeypatch.setattr(gen, "MTPDrafter", lambda model, capacity: ScriptedDrafter(reference, wrong_every))
    (tokens,), stats = gen.speculative_generate(model, [prompt], 20)
    assert tokens == reference[len(prompt):]
    assert stats.drafted > 0
    if rate is not None:
        assert stats.acceptance_rate == rate
    else:
        assert 0 < stats.acceptance_rate < 1
        assert stats.drafted < 20  # accepted drafts saved verification forwards


def test_speculative_with_the_real_mtp_module_equals_greedy():
    model = tiny(yarn=True)
    outputs, stats = gen.speculative_generate(model, PROMPTS, 16)
    assert outputs == gen.generate(model, PROMPTS, 16)
    assert stats.drafted >= 16 - 1 and 0 <= stats.acceptance_rate <= 1


def test_speculative_stops_at_stop_tokens_and_max_new_tokens():
    model = tiny()
    free = gen.generate(model, PROMPTS, 12)
    stop = free[2][5]
    outputs, _ = gen.speculative_generate(model, PROMPTS, 12, stop_tokens=[stop])
    assert outputs == gen.generate(model, PROMPTS, 12, stop_tokens=[stop])
    assert [len(o) for o in gen.speculative_generate(model, PROMPTS, 7)[0]] == [7, 7, 7]


def test_speculative_without_mtp_module_is_refused():
    with pytest.raises(ValueError, match="needs an MTP module but the model has mtp_depth=0"):
        gen.speculative_generate(tiny(mtp_depth=0), PROMPTS, 4)


# ------------------------------------------------------------------------------ command line
def test_cli_prints_the_greedy_completion_and_acceptance_rate(tmp_path, capsys):
    model = tiny()
    save_dcp_model(model, tmp_path / "ckpt")
    expected = gen.generate(model, [[5, 17, 3]], 6)[0]
    gen.main([str(tmp_path / "ckpt"), "--prompt-ids", "5,17,3", "--max-new-tokens", "6"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == " ".join(map(str, expected))
    gen.main([str(tmp_path / "ckpt"), "--prompt-ids", "5 17 3", "--max-new-tokens", "6", "--speculative"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == " ".join(map(str, expected)) and "acceptance rate" in lines[1]


def test_cli_encodes_text_as_a_document_start_and_stops_at_end_of_text(tmp_path, capsys):
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, MIN_VOCAB_SIZE + 4)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = tiny(vocab=MIN_VOCAB_SIZE + 4)
    save_dcp_model(model, tmp_path / "ckpt")
    eos = eos_id(tokenizer)
    prompt = [eos] + tokenizer.encode("def f(").ids
    expected = gen.generate(model, [prompt], 8, stop_tokens=[eos])[0]
    gen.main([str(tmp_path / "ckpt"), "--prompt", "def f(", "--max-new-tokens", "8",
              "--tokenizer", str(tmp_path / "tokenizer.json")])
    assert expected and capsys.readouterr().out.startswith(tokenizer.decode(expected) + "\n[")


def test_cli_reads_hugging_face_directories(tmp_path, capsys):
    model = tiny()
    save_hf_checkpoint(model, tmp_path / "hf")
    expected = gen.generate(model, [[7, 8, 9]], 5)[0]
    gen.main([str(tmp_path / "hf"), "--prompt-ids", "7 8 9", "--max-new-tokens", "5", "--speculative"])
    assert capsys.readouterr().out.splitlines()[0] == " ".join(map(str, expected))


def test_cli_errors_name_the_fix(tmp_path):
    save_dcp_model(tiny(mtp_depth=0), tmp_path / "ckpt")
    with pytest.raises(SystemExit, match="mtp_depth=0"):
        gen.main([str(tmp_path / "ckpt"), "--prompt-ids", "1 2", "--speculative"])
    with pytest.raises(SystemExit, match="no tokenizer found .*--prompt-ids"):
        gen.main([str(tmp_path / "ckpt"), "--prompt", "def f("])
    with pytest.raises(SystemExit, match="--speculative decodes greedily"):
        gen.main([str(tmp_path / "ckpt"), "--prompt-ids", "1", "--speculative", "--temperature", "1"])
