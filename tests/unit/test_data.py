"""Data pipeline: corpus sources, byte-level BPE, cached shards, packed sampler."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3_train.config import ConfigError, DataConfig
from dsv3_train.data import (EOS_TOKEN, MIN_VOCAB_SIZE, SPECIAL_TOKENS, PackedSampler, TokenSplit,
                             build_dataset, check_source, is_validation_doc, iter_documents,
                             load_tokenizer, train_tokenizer, validation_batches)
from dsv3_train.data import shards as shards_mod

REPO = Path(__file__).resolve().parents[2]
VOCAB = 320


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct pseudo-English documents (enough byte pairs for a few hundred merges)."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(300)]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(20, 120))) + ".\n"
            for i in range(n)]


def write_folder(root: Path, texts: list[str], reverse: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = list(enumerate(texts))
    for i, text in reversed(items) if reverse else items:
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(text)
    (root / "ignored.bin").write_bytes(b"\x00\x01")  # wrong suffix: not read
    return root


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "meta": i}) + "\n" for i, t in enumerate(texts)))
    return path


def data_cfg(source: Path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("max_bytes", 0)
    kw.setdefault("val_fraction", 0.2)
    return DataConfig(source=str(source), **kw)


def split_docs(ds, split) -> list[str]:
    """Decode a split's stream back into documents (cut at EOS)."""
    stream = np.concatenate([np.asarray(s) for s in split.shards]).astype(np.int64)
    assert stream[-1] == ds.eos_id
    cuts = np.flatnonzero(stream == ds.eos_id)
    pieces = np.split(stream, cuts + 1)[:-1]
    return [ds.tokenizer.decode(p[:-1].tolist()) for p in pieces]


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_and_has_exact_size():
    tok = train_tokenizer(make_texts(40), VOCAB)
    assert tok.get_vocab_size() == VOCAB and MIN_VOCAB_SIZE == 258
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1]
    for text in ["doc 3: hello world.\n", "héllo ✓ 🐍\n\tcafé  spaces  ", "x = {'a': [1, 2]}\r\n"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_too_small_corpus_names_sizes():
    with pytest.raises(ValueError, match=r"reached \d+ tokens, not vocab_size=5000"):
        train_tokenizer(["ab ab ab"], 5000)
    with pytest.raises(ValueError, match="vocab_size \\(100\\)"):
        train_tokenizer(["ab"], 100)


# ---------------------------------------------------------------- corpus

def test_folder_order_is_independent_of_creation_order(tmp_path):
    texts = make_texts(20)
    a = write_folder(tmp_path / "a", texts)
    b = write_folder(tmp_path / "b", texts, reverse=True)
    docs_a = list(iter_documents(data_cfg(a, tmp_path)))
    docs_b = list(iter_documents(data_cfg(b, tmp_path)))
    assert docs_a == docs_b and len(docs_a) == 20
    assert sorted(d for d, _ in docs_a) != [d for d, _ in docs_a]  # hash order, not name order


def test_max_bytes_stops_after_crossing(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", make_texts(30) + ["", "   "])
    docs = list(iter_documents(data_cfg(src, tmp_path, max_bytes=1000)))
    sizes = [len(t.encode()) for _, t in docs]
    assert sum(sizes) >= 1000 > sum(sizes[:-1])
    assert all(t.strip() for _, t in docs)
    assert len(list(iter_documents(data_cfg(src, tmp_path)))) == 30  # empty docs skipped


def test_validation_hash_is_stable_across_processes():
    ids = [str(i) for i in range(200)]
    here = [is_validation_doc(d, 0.3) for d in ids]
    code = ("from dsv3_train.data.corpus import is_validation_doc;"
            "print(''.join(str(int(is_validation_doc(str(i), 0.3))) for i in range(200)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "".join(str(int(v)) for v in here)
    assert 30 < sum(here) < 90


@pytest.mark.parametrize("kind", ["missing", "empty_folder", "not_jsonl", "no_text_first",
                                  "no_text_later"])
def test_source_errors_name_the_value(tmp_path, kind):
    if kind == "missing":
        src, match = tmp_path / "nope", "nope'\\) does not exist: give a folder"
    elif kind == "empty_folder":
        src, match = tmp_path / "empty", "empty'\\) has no files ending in"
        src.mkdir()
        (src / "x.bin").write_bytes(b"1")
    elif kind == "not_jsonl":
        src, match = tmp_path / "a.csv", "a.csv'\\) is a file but not a .jsonl"
        src.write_text("text\n")
    else:
        lines = ['{"body": "x"}'] if kind == "no_text_first" else ['{"text": "ok"}', '{"body": 1}']
        src = tmp_path / "bad.jsonl"
        src.write_text("\n".join(lines) + "\n")
        match = f"bad.jsonl'\\) line {len(lines)} has no 'text' field"
    cfg = data_cfg(src, tmp_path)
    with pytest.raises(ConfigError, match=match):
        check_source(cfg) if kind != "no_text_later" else build_dataset(cfg, VOCAB, progress=False)


# ---------------------------------------------------------------- shards + cache

@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jsonl")
    texts = make_texts(40) + ["literal <|endoftext|> inside a document\n"]
    src = write_jsonl(tmp / "corpus.jsonl", texts)
    cfg = data_cfg(src, tmp)
    return cfg, texts, build_dataset(cfg, VOCAB, progress=False)


def test_stream_has_eos_after_every_document(jsonl_dataset):
    cfg, texts, ds = jsonl_dataset
    assert ds.vocab_size == VOCAB and ds.eos_id == ds.tokenizer.token_to_id(EOS_TOKEN) == 0
    train, val = split_docs(ds, ds.train), split_docs(ds, ds.val)
    # the literal "<|endoftext|>" in a document stays text, not a document boundary
    assert sorted(train + val) == sorted(texts)
    assert (ds.train.num_docs, ds.val.num_docs) == (len(train), len(val))
    assert ds.train.shards[0].dtype == np.uint16


def test_split_is_disjoint_by_document_and_stable(jsonl_dataset, tmp_path):
    cfg, texts, ds = jsonl_dataset
    val_ids = {d for d, _ in iter_documents(cfg) if is_validation_doc(d, cfg.val_fraction)}
    by_id = dict(iter_documents(cfg))
    assert sorted(split_docs(ds, ds.val)) == sorted(by_id[d] for d in val_ids)
    assert not set(split_docs(ds, ds.train)) & set(split_docs(ds, ds.val))
    again = build_dataset(data_cfg(cfg.source, tmp_path, shard_tokens=700), VOCAB, progress=False)
    assert again.path != ds.path and len(again.train.shards) > 1
    assert all(len(s) <= 700 for s in again.train.shards)
    for name in ("train", "val"):
        a, b = getattr(ds, name), getattr(again, name)
        assert np.array_equal(np.concatenate(a.shards), np.concatenate(b.shards))


def test_tiny_corpus_still_gets_a_validation_document(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", make_texts(3) * 1)
    ds = build_dataset(data_cfg(src, tmp_path, val_fraction=0.01), MIN_VOCAB_SIZE, progress=False)
    assert (ds.train.num_docs, ds.val.num_docs) == (2, 1)


def test_cache_hit_reuses_files(jsonl_dataset, monkeypatch):
    cfg, _, ds = jsonl_dataset
    mtimes = {p.name: p.stat().st_mtime_ns for p in ds.path.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("rebuilt despite a cache hit")

    monkeypatch.setattr(shards_mod, "train_tokenizer", boom)
    monkeypatch.setattr(shards_mod, "_write_entry", boom)
    again = build_dataset(cfg, VOCAB, progress=False)
    assert again.path == ds.path
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == mtimes
    assert [p.name for p in ds.path.parent.iterdir() if p.name.startswith(".tmp")] == []


def test_concurrent_builds_share_one_entry(tmp_path):
    src = write_folder(tmp_path / "src", make_texts(30))
    cache = tmp_path / "cache"
    code = ("import sys; from dsv3_train.config import DataConfig;"
            "from dsv3_train.data import build_dataset;"
            f"d = build_dataset(DataConfig(source={str(src)!r}, cache_dir={str(cache)!r}, "
            f"val_fraction=0.2), {VOCAB}, progress=False);"
            "print(d.path, d.train.num_tokens, d.val.num_tokens)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(outs) == 1
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == \
        [Path(outs.pop().split()[0]).name]


def test_stale_temp_dir_of_dead_builder_is_removed(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", make_texts(20))
    cfg = data_cfg(src, tmp_path)
    first = build_dataset(cfg, VOCAB, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = first.path.parent / f".tmp-{first.path.name}-dead"
    first.path.rename(stale)
    (stale / ".owner").write_text(f"{os.uname().nodename} {dead.pid}")
    build_dataset(cfg, VOCAB, progress=False)
    assert not stale.exists() and (first.path / "meta.json").is_file()


def test_given_tokenizer_is_used_and_its_size_checked(jsonl_dataset, tmp_path):
    cfg, _, ds = jsonl_dataset
    tok_path = ds.path / "tokenizer.json"
    assert load_tokenizer(tok_path).get_vocab_size() == VOCAB
    cfg2 = data_cfg(cfg.source, tmp_path, tokenizer=str(tok_path))
    same = build_dataset(cfg2, VOCAB, progress=False)
    assert np.array_equal(np.concatenate(same.train.shards), np.concatenate(ds.train.shards))
    with pytest.raises(ConfigError, match=f"has vocab size {VOCAB} but model.vocab_size is 400"):
        build_dataset(cfg2, 400, progress=False)
    with pytest.raises(ConfigError, match="missing.json'\\) does not exist"):
        load_tokenizer(tmp_path / "missing.json")


def test_stdlib_corpus_builds(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), max_bytes=200_000)
    ds = build_dataset(cfg, 512, progress=False)
    assert ds.train.num_tokens > 20_000 and ds.val.num_tokens > 0
    assert ds.path.name.startswith("stdlib-v512-")
    assert all("site-packages" not in d for d, _ in iter_documents(cfg))


# ---------------------------------------------------------------- sampler

def toy_split() -> TokenSplit:
    """Two shards whose values identify positions: 0..999 and 5000..5699."""
    return TokenSplit(shards=[np.arange(1000, dtype=np.uint16),
                              np.arange(5000, 5700, dtype=np.uint16)])


def draw(sampler: PackedSampler, n: int) -> list[torch.Tensor]:
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_windows_and_determinism():
    split = toy_split()
    a = PackedSampler(split, seq_len=16, global_batch_size=8, seed=3)
    assert a.num_windows == 999 // 16 + 699 // 16
    batches = draw(a, 5)
    for batch in batches:
        assert batch.shape == (8, 17) and batch.dtype == torch.long
        assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)  # never crosses a shard boundary
        assert torch.all(((batch[:, 0] % 5000) % 16) == 0)  # stride seq_len
    again = draw(PackedSampler(split, 16, 8, seed=3), 5)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    other = draw(PackedSampler(split, 16, 8, seed=4), 5)
    assert not all(torch.equal(x, y) for x, y in zip(batches, other))


def test_sampler_epochs_cover_every_window_once():
    sampler = PackedSampler(toy_split(), seq_len=16, global_batch_size=7, seed=0)
    n = sampler.num_windows  # 105, not a multiple of 7 -> batches straddle epochs
    rows = torch.cat(draw(sampler, (3 * n) // 7 + 1))[:, 0].tolist()
    epochs = [rows[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == n
    assert epochs[0] != epochs[1] and set(epochs[0]) == set(epochs[1])


def test_sampler_resume_is_bit_identical():
    split = toy_split()
    a = PackedSampler(split, 16, 6, seed=1)
    draw(a, 25)  # past the first epoch boundary (105 windows)
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = draw(a, 10)
    b = PackedSampler(split, 16, 6, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(x, y) for x, y in zip(expected, draw(b, 10)))
    with pytest.raises(ValueError, match="seq_len=16 but this sampler has 8"):
        PackedSampler(split, 8, 6, seed=1).load_state_dict(state)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_sampler_dp_ranks_concatenate_to_the_global_batch(dp_size):
    split = toy_split()
    whole = draw(PackedSampler(split, 16, 8, seed=2), 20)
    ranks = [draw(PackedSampler(split, 16, 8, seed=2, dp_rank=r, dp_size=dp_size), 20)
             for r in range(dp_size)]
    for step, batch in enumerate(whole):
        parts = [ranks[r][step] for r in range(dp_size)]
        assert parts[0].shape == (8 // dp_size, 17)
        assert torch.equal(torch.cat(parts), batch)


def test_sampler_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size \(10\).*dp_size \(4\)"):
        PackedSampler(toy_split(), 16, 10, seed=0, dp_size=4)
    with pytest.raises(ConfigError, match=r"1700 tokens = 12 windows of seq_len\+1=129.*of 32"):
        PackedSampler(toy_split(), 128, 32, seed=0)


def test_validation_batches_are_fixed_and_spread():
    split = toy_split()
    batches = validation_batches(split, 16, batch_size=4, num_batches=3)
    assert [b.shape for b in batches] == [(4, 17)] * 3
    assert all(torch.equal(x, y) for x, y in zip(batches, validation_batches(split, 16, 4, 3)))
    starts = torch.cat(batches)[:, 0].tolist()
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] >= 5000  # spans both shards
    small = TokenSplit(shards=[np.arange(40, dtype=np.uint16)])  # 2 windows of 17
    cyc = torch.cat(validation_batches(small, 16, 3, 2))[:, 0].tolist()
    assert cyc == [0, 16, 0, 16, 0, 16]
    with pytest.raises(ConfigError, match=r"has 10 tokens.*seq_len\+1=17"):
        validation_batches(TokenSplit(shards=[np.arange(10, dtype=np.uint16)]), 16, 2, 2)
