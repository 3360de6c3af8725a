"""Data pipeline: documents -> byte-level BPE -> cached memmap token shards -> packed batches.

Typical use::

    from dsv3_train.data import build_dataset, PackedSampler, validation_batches

    data = build_dataset(cfg.data, cfg.model.vocab_size)
    sampler = PackedSampler(data.train, seq_len, global_batch_size, seed, dp_rank, dp_size)
    batch = sampler.next_batch()          # (global_batch_size // dp_size, seq_len + 1) int64
    val = validation_batches(data.val, seq_len, micro_batch_size, eval_batches)

The names below are imported lazily (PEP 562): ``dsv3_train.config`` imports
``dsv3_train.data.tokenizer`` while validating, and that must not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "iter_documents": "corpus", "check_source": "corpus", "is_validation_doc": "corpus",
    "SPECIAL_TOKENS": "tokenizer", "EOS_TOKEN": "tokenizer", "MIN_VOCAB_SIZE": "tokenizer",
    "train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "build_dataset": "shards", "load_dataset": "shards", "TokenDataset": "shards",
    "TokenSplit": "shards",
    "PackedSampler": "sampler", "validation_batches": "sampler",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from dsv3_train.data.corpus import check_source, is_validation_doc, iter_documents
    from dsv3_train.data.sampler import PackedSampler, validation_batches
    from dsv3_train.data.shards import TokenDataset, TokenSplit, build_dataset, load_dataset
    from dsv3_train.data.tokenizer import (EOS_TOKEN, MIN_VOCAB_SIZE, SPECIAL_TOKENS,
                                           load_tokenizer, train_tokenizer)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
