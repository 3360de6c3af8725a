"""Packed training batches: deterministic, resumable, sliceable across data-parallel ranks.

Windows. A split's token stream is cut, shard by shard, into windows of ``seq_len + 1``
tokens starting every ``seq_len`` tokens, so consecutive windows share one token: window
``w`` gives inputs ``w[:-1]`` and targets ``w[1:]``, and every token of a shard except its
first is a target exactly once per epoch. Windows never cross a shard boundary (a shard of
``n`` tokens holds ``(n - 1) // seq_len`` windows; the short tail is dropped). Documents are
packed: a window may span several documents, separated by ``<|endoftext|>``.

Order. Epoch ``e`` visits every window once, in the permutation drawn by
``numpy.random.default_rng([seed, e])``. The epochs form one stream of window indices and
global batch ``k`` is stream entries ``[k * G, (k + 1) * G)``, so a batch may straddle two
epochs and no window is ever skipped. Rank ``r`` of ``dp_size`` returns rows
``[r * G / dp_size, (r + 1) * G / dp_size)`` of that global batch.
"""
from __future__ import annotations

import numpy as np
import torch

from dsv3_train.config import ConfigError
from dsv3_train.data.shards import TokenSplit


class _Windows:
    """Window index -> tokens, for the windows of one split."""

    def __init__(self, split: TokenSplit, seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len ({seq_len}) must be > 0")
        self.shards = split.shards
        self.seq_len = seq_len
        counts = [max(len(shard) - 1, 0) // seq_len for shard in self.shards]
        self.ends = np.cumsum(counts, dtype=np.int64)  # (num_shards,) windows up to each shard
        self.count = int(self.ends[-1]) if len(self.ends) else 0

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """Tokens of the given windows: ``(len(indices), seq_len + 1)`` int64."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        shard_ids = np.searchsorted(self.ends, indices, side="right")  # (len(indices),)
        for row, (index, shard_id) in enumerate(zip(indices, shard_ids)):
            first = int(index) - (int(self.ends[shard_id - 1]) if shard_id else 0)
            start = first * self.seq_len
            out[row] = self.shards[shard_id][start:start + self.seq_len + 1]
        return torch.from_numpy(out)


class PackedSampler:
    """Endless seeded stream of packed ``(rows, seq_len + 1)`` batches; see the module doc."""

    def __init__(self, split: TokenSplit, seq_len: int, global_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        if global_batch_size <= 0 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple "
                             f"of dp_size ({dp_size}): change micro_batch_size/grad_accum or the "
                             f"number of data-parallel ranks")
        self.windows = _Windows(split, seq_len)
        if self.windows.count < global_batch_size:
            raise ConfigError(
                f"the split has {split.num_tokens} tokens = {self.windows.count} windows of "
                f"seq_len+1={seq_len + 1}, fewer than one global batch of {global_batch_size}: "
                f"lower the batch size or seq_len, or give more text (data.max_bytes)")
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        self.epoch, self.position = 0, 0  # next window: entry `position` of epoch `epoch`
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def num_windows(self) -> int:
        return self.windows.count

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global batch: ``(global_batch_size // dp_size, seq_len + 1)``."""
        indices = self._next_global_indices()  # (global_batch_size,)
        mine = indices[self.dp_rank * self.per_rank:(self.dp_rank + 1) * self.per_rank]
        return self.windows.gather(mine)

    def _next_global_indices(self) -> np.ndarray:
        """Advance by one global batch; returns its window indices, possibly from two epochs."""
        parts, needed = [], self.global_batch_size
        while needed:
            order = self._epoch_order(self.epoch)
            take = min(needed, len(order) - self.position)
            parts.append(order[self.position:self.position + take])
            self.position += take
            needed -= take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of all window indices for ``epoch`` (cached per epoch)."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(self.num_windows), epoch
        return self._order

    def state_dict(self) -> dict:
        """Plain ints: where the stream stands, plus what it was built from (checked on load)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_windows": self.num_windows, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that produced ``state`` stopped."""
        for name in ("seq_len", "seed", "num_windows"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"sampler state has {name}={state[name]} but this sampler has "
                                 f"{getattr(self, name)}: resume with the same data, seq_len and "
                                 f"seed, or start a fresh run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def validation_batches(split: TokenSplit, seq_len: int, batch_size: int,
                       num_batches: int) -> list[torch.Tensor]:
    """Fixed held-out batches, each ``(batch_size, seq_len + 1)``, the same on every call.

    Takes ``batch_size * num_batches`` windows spread evenly over the split; if the split
    holds fewer windows, they are reused cyclically.
    """
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size ({batch_size}) and num_batches ({num_batches}) must be > 0")
    windows = _Windows(split, seq_len)
    if windows.count == 0:
        raise ConfigError(f"the validation split has {split.num_tokens} tokens, less than one "
                          f"window of seq_len+1={seq_len + 1}: raise data.val_fraction or "
                          f"data.max_bytes, or lower seq_len")
    wanted = batch_size * num_batches
    if windows.count >= wanted:
        indices = np.arange(wanted, dtype=np.int64) * windows.count // wanted  # evenly spread
    else:
        indices = np.arange(wanted, dtype=np.int64) % windows.count
    return [windows.gather(indices[i * batch_size:(i + 1) * batch_size])
            for i in range(num_batches)]
