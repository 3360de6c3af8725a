"""A character-level tokenizer with the reasoning tags as single tokens.

Post-training tasks here are short strings over a small alphabet (digits, operators, the four
tags), so one id per character keeps sequences short and the vocabulary ~100: a toy model learns
them on a CPU in minutes. Ids: ``<pad>`` 0, ``<eos>`` 1, the four tags, then printable ASCII.
``decode(encode(text)) == text`` for any printable-ASCII text.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from dsv3_train.posttrain.template import TAGS

PAD, EOS = "<pad>", "<eos>"
SPECIALS = (PAD, EOS) + TAGS
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


class CharTokenizer:
    """Special tokens (matched greedily) and single characters <-> ids."""

    def __init__(self, characters: str = CHARACTERS, specials: tuple[str, ...] = SPECIALS):
        self.specials, self.characters = tuple(specials), characters
        self.vocab = list(self.specials) + list(characters)
        self.ids = {token: index for index, token in enumerate(self.vocab)}
        if len(self.ids) != len(self.vocab):
            raise ValueError(f"tokenizer vocabulary repeats a token: {self.vocab}")
        self.pad_id, self.eos_id = self.ids[PAD], self.ids[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids, position = [], 0
        while position < len(text):
            special = next((s for s in self.specials if text.startswith(s, position)), None)
            token = special or text[position]
            if token not in self.ids:
                raise ValueError(f"character {token!r} at {position} of {text!r} is not in the tokenizer's "
                                 f"alphabet: build CharTokenizer(characters=...) with it")
            ids.append(self.ids[token])
            position += len(token)
        return ids

    def decode(self, ids: list[int], skip: tuple[str, ...] = (PAD, EOS)) -> str:
        """Text of ids; pad and eos are dropped by default."""
        return "".join(self.vocab[i] for i in ids if self.vocab[i] not in skip)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"characters": self.characters, "specials": list(self.specials)}))

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        spec = json.loads(Path(path).read_text())
        return cls(spec["characters"], tuple(spec["specials"]))
