"""Byte-level BPE tokenizer, trained with the Rust ``tokenizers`` library.

Byte-level means every string round-trips: the 256 byte symbols are always in the
vocabulary, so there is no unknown token and ``decode(encode(x)) == x`` for any text.
The special tokens come first, so ``<|endoftext|>`` is id 0 and ``<|pad|>`` is id 1.

``dsv3_train.config`` imports :data:`MIN_VOCAB_SIZE` from here while validating a config,
so this module imports ``tokenizers`` lazily: importing it costs nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Union

from dsv3_train.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
"""Special tokens, in id order (they occupy ids 0 and 1)."""
EOS_TOKEN = "<|endoftext|>"
"""Appended after every document in the token stream."""
PAD_TOKEN = "<|pad|>"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The 256 byte symbols plus the special tokens: the smallest byte-level vocabulary."""

_TRAIN_BATCH_CHARS = 1 << 20  # feed the trainer ~1M characters per batch


def train_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False) -> "Tokenizer":
    """Train a byte-level BPE on ``texts`` to exactly ``vocab_size`` tokens.

    Raises :class:`~dsv3_train.config.ConfigError` (a ``ValueError``) when ``vocab_size`` is
    below :data:`MIN_VOCAB_SIZE` or when the corpus has too few distinct byte pairs to learn
    enough merges to reach it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size ({vocab_size}) is too small for a byte-level BPE "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens): use at least "
                          f"{MIN_VOCAB_SIZE}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(_batched(texts), trainer=trainer)
    reached = tokenizer.get_vocab_size()
    if reached != vocab_size:
        raise ConfigError(f"the BPE reached {reached} tokens, not vocab_size={vocab_size}: the "
                          f"corpus has too few distinct byte pairs; lower model.vocab_size to at "
                          f"most {reached} or give more text (data.source / data.max_bytes)")
    _check_special_ids(tokenizer, "the trained tokenizer")
    return tokenizer


def load_tokenizer(path: Union[str, Path]) -> "Tokenizer":
    """Load a ``tokenizer.json``; ConfigError if it is missing or lacks the special tokens."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer file ({str(path)!r}) does not exist: give the path of a "
                          f"tokenizer.json, or null to train one")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ConfigError(f"tokenizer file ({str(path)!r}) could not be read ({exc}): give a "
                          f"tokenizer.json saved by the tokenizers library") from exc
    if tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ConfigError(f"tokenizer file ({str(path)!r}) has no {EOS_TOKEN!r} token: add it as "
                          f"a special token or train one (data.tokenizer=null)")
    return tokenizer


def eos_id(tokenizer: "Tokenizer") -> int:
    """Id of the end-of-document token."""
    return tokenizer.token_to_id(EOS_TOKEN)


def _check_special_ids(tokenizer: "Tokenizer", what: str) -> None:
    """The rest of the code relies on the special tokens having ids 0, 1, ..."""
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.token_to_id(token)
        if got != expected:
            raise AssertionError(f"{what} maps {token!r} to {got}, expected {expected}")


def _batched(texts: Iterable[str]) -> Iterator[list[str]]:
    """Group texts into lists of ~1M characters: fewer Python->Rust calls, bounded memory."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= _TRAIN_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
