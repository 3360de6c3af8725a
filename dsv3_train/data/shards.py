"""Token shards: the corpus encoded once into flat memmap files, cached by config.

Layout of one cache entry ``<cache_dir>/<name>-<key>/``::

    tokenizer.json          the tokenizer the tokens were made with
    train_00000.bin, ...    raw uint16/uint32 token ids, at most shard_tokens each
    val_00000.bin, ...
    meta.json               counts, dtype, shard names (written last)

Each split is one token stream: every document's tokens followed by ``<|endoftext|>``.
An entry is built in a temporary folder beside the final one and renamed into place,
so readers never see half an entry; a lock file keeps concurrent callers (e.g. several
ranks on one node) from building the same entry twice. Changing the files of a folder
source does not change the key: delete the entry (or the cache) to re-read them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from dsv3_train.config import ConfigError, DataConfig
from dsv3_train.data.corpus import (check_source, is_validation_doc, iter_documents, source_key,
                                    split_hash)
from dsv3_train.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, train_tokenizer

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer

FORMAT_VERSION = 1
"""Bump when the on-disk layout or the tokenisation changes: old cache entries are ignored."""
_ENCODE_BATCH_CHARS = 1 << 20  # characters per encode_batch call
log = logging.getLogger(__name__)


@dataclass
class TokenSplit:
    """One split's token stream, stored as consecutive memmap shards."""

    shards: list[np.memmap]
    """Read-only 1-D token arrays; the stream is their concatenation."""
    num_docs: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(shard) for shard in self.shards)


@dataclass
class TokenDataset:
    """A built (or cached) dataset: tokenizer plus train and validation token streams."""

    tokenizer: "Tokenizer"
    eos_id: int
    vocab_size: int
    train: TokenSplit
    val: TokenSplit
    path: Path


def build_dataset(cfg: DataConfig, vocab_size: int, progress: bool = True) -> TokenDataset:
    """Load the cache entry for ``(cfg, vocab_size)``, building it first if it is missing."""
    check_source(cfg)
    if cfg.tokenizer is not None:
        _given_tokenizer(cfg, vocab_size)  # fail fast, before reading the corpus
    key = _cache_key(cfg, vocab_size)
    cache_dir = Path(cfg.cache_dir).expanduser()
    final = cache_dir / f"{_slug(cfg)}-v{vocab_size}-{_short_hash(key)}"
    if not (final / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(cache_dir / f".{final.name}.lock"):
            if not (final / "meta.json").is_file():  # another process may have built it
                _remove_stale_temps(final)
                _build_entry(cfg, vocab_size, key, final, progress)
    return load_dataset(final)


def load_dataset(path: Path) -> TokenDataset:
    """Open a finished cache entry (tokenizer + memmaps); checks the files against meta.json."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    tokenizer = load_tokenizer(path / "tokenizer.json")
    splits = {name: _open_split(path, meta, name) for name in ("train", "val")}
    return TokenDataset(tokenizer=tokenizer, eos_id=meta["eos_id"], vocab_size=meta["vocab_size"],
                        train=splits["train"], val=splits["val"], path=path)


def _open_split(path: Path, meta: dict, name: str) -> TokenSplit:
    dtype = np.dtype(meta["dtype"])
    shards = []
    for shard_name, count in zip(meta[name]["shards"], meta[name]["shard_tokens"]):
        file = path / shard_name
        if not file.is_file() or file.stat().st_size != count * dtype.itemsize:
            raise ConfigError(f"cache entry {str(path)!r} is damaged ({shard_name} is missing or "
                              f"has the wrong size): delete that folder to rebuild it")
        shards.append(np.memmap(file, dtype=dtype, mode="r"))  # (count,)
    return TokenSplit(shards=shards, num_docs=meta[name]["num_docs"])


def _build_entry(cfg: DataConfig, vocab_size: int, key: dict, final: Path, progress: bool) -> None:
    """Build into a temporary folder next to ``final``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        (tmp / ".owner").write_text(f"{socket.gethostname()} {os.getpid()}")
        log.info("building token cache %s", final)
        meta = _write_entry(cfg, vocab_size, tmp, progress)
        meta["key"] = key
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / ".owner").unlink()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename


def _write_entry(cfg: DataConfig, vocab_size: int, out: Path, progress: bool) -> dict:
    """Tokenizer + shards into ``out``; returns meta.json's content (without the key)."""
    val_ids = _validation_ids(cfg, progress)
    tokenizer = _get_tokenizer(cfg, vocab_size, val_ids, progress)
    tokenizer.save(str(out / "tokenizer.json"))
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    writers = {name: _ShardWriter(out, name, dtype, cfg.shard_tokens) for name in ("train", "val")}
    eos = eos_id(tokenizer)
    for doc_ids, token_lists in _encode(cfg, tokenizer, progress):
        for doc_id, ids in zip(doc_ids, token_lists):
            writers["val" if doc_id in val_ids else "train"].append(ids + [eos])
    meta = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "dtype": dtype.name,
            "eos_id": eos}
    for name, writer in writers.items():
        meta[name] = writer.close()
    return meta


def _validation_ids(cfg: DataConfig, progress: bool) -> set[str]:
    """Held-out doc ids by stable hash (:func:`is_validation_doc`).

    If the hash holds out no document (or all of them), the one with the lowest split hash
    is held out alone, so tiny corpora (tests, a handful of files) still get both splits.
    """
    doc_ids = [doc_id for doc_id, _ in _tqdm(iter_documents(cfg), progress, "scan documents")]
    if len(doc_ids) < 2:
        raise ConfigError(f"data.source ({cfg.source!r}) gave {len(doc_ids)} non-empty "
                          f"document(s) within max_bytes={cfg.max_bytes}: need at least 2 (one "
                          f"for validation); add documents or raise data.max_bytes")
    val_ids = {d for d in doc_ids if is_validation_doc(d, cfg.val_fraction)}
    if not val_ids or len(val_ids) == len(doc_ids):
        val_ids = {min(doc_ids, key=split_hash)}
    return val_ids


def _get_tokenizer(cfg: DataConfig, vocab_size: int, val_ids: set[str], progress: bool):
    """Load ``cfg.tokenizer`` (checking its size) or train one on the training documents."""
    if cfg.tokenizer is not None:
        return _given_tokenizer(cfg, vocab_size)
    texts = (text for doc_id, text in iter_documents(cfg) if doc_id not in val_ids)
    if progress:
        print(f"training a {vocab_size}-token byte-level BPE on {cfg.source!r}", file=sys.stderr)
    return train_tokenizer(texts, vocab_size, progress=progress)


def _given_tokenizer(cfg: DataConfig, vocab_size: int) -> "Tokenizer":
    """``cfg.tokenizer``, loaded; ConfigError naming both sizes if it is not ``vocab_size``."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    size = tokenizer.get_vocab_size()
    if size != vocab_size:
        raise ConfigError(f"data.tokenizer ({cfg.tokenizer!r}) has vocab size {size} but "
                          f"model.vocab_size is {vocab_size}: set model.vocab_size={size} or use "
                          f"a matching tokenizer")
    return tokenizer


def _encode(cfg: DataConfig, tokenizer, progress: bool) -> Iterator[tuple[list[str], list[list[int]]]]:
    """Encode documents in ~1M-character batches; literal special-token text stays plain text."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    tokenizer.encode_special_tokens = True  # a document containing "<|endoftext|>" is not an EOS
    try:
        for batch in _batches(_tqdm(iter_documents(cfg), progress, "encode documents")):
            doc_ids, texts = zip(*batch)
            yield list(doc_ids), [enc.ids for enc in encode(list(texts), add_special_tokens=False)]
    finally:
        tokenizer.encode_special_tokens = False


def _batches(docs: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends token ids to ``<split>_NNNNN.bin`` files of at most ``shard_tokens`` each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.names: list[str] = []
        self.counts: list[int] = []
        self.num_docs = 0
        self.file = None

    def append(self, ids: list[int]) -> None:
        """Append one document's ids (EOS included), spilling into new shards as needed."""
        tokens = np.asarray(ids, dtype=self.dtype)  # (doc_len,)
        self.num_docs += 1
        while len(tokens):
            if self.file is None or self.counts[-1] == self.limit:
                self._open_next()
            take = min(len(tokens), self.limit - self.counts[-1])
            tokens[:take].tofile(self.file)
            self.counts[-1] += take
            tokens = tokens[take:]

    def _open_next(self) -> None:
        if self.file is not None:
            self.file.close()
        self.names.append(f"{self.split}_{len(self.names):05d}.bin")
        self.counts.append(0)
        self.file = open(self.out / self.names[-1], "wb")

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
        return {"shards": self.names, "shard_tokens": self.counts,
                "num_tokens": sum(self.counts), "num_docs": self.num_docs}


def _cache_key(cfg: DataConfig, vocab_size: int) -> dict:
    """Everything the entry's content depends on (shard_tokens only changes the file split)."""
    tokenizer = None
    if cfg.tokenizer is not None:
        tok_path = Path(cfg.tokenizer).expanduser().resolve()
        digest = hashlib.sha256(tok_path.read_bytes()).hexdigest()[:16] if tok_path.is_file() else None
        tokenizer = {"path": str(tok_path), "sha256": digest}
    return {"format_version": FORMAT_VERSION, "source": source_key(cfg), "max_bytes": cfg.max_bytes,
            "vocab_size": vocab_size, "tokenizer": tokenizer, "val_fraction": cfg.val_fraction,
            "file_suffixes": cfg.file_suffixes, "eos": EOS_TOKEN}


def _short_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _slug(cfg: DataConfig) -> str:
    """A readable prefix for the entry's folder name."""
    name = "stdlib" if cfg.source == "stdlib" else Path(cfg.source).expanduser().resolve().stem
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "data"


def _remove_stale_temps(final: Path) -> None:
    """Delete temp folders of this entry whose builder (same host, by pid) has died.

    Builders on other hosts sharing the cache (where flock may not reach) are left alone.
    """
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            host, pid = (tmp / ".owner").read_text().split()
        except (OSError, ValueError):
            continue  # just created, or not ours to judge
        if host == socket.gethostname() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename still keeps us safe
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tqdm(items: Iterable, progress: bool, desc: str) -> Iterable:
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="doc")
