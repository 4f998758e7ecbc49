"""Packed, shuffled, DDP-aware batches straight from memory-mapped token shards.

The token stream (all shards end to end) is cut into chunks of block_size + 1 tokens that start
every block_size tokens, so neighbouring chunks share one token and every token is a target
exactly once per epoch. Documents run across chunk edges: no padding, nothing wasted.
"""
import bisect
import os

import numpy as np
import torch

from smolhub.errors import UserError


class DrawnBatches:
    """Batches of items (chunks of a token stream, packed rows, preference pairs) drawn in an order
    given by (seed, epoch): every step takes the next world_size * batch_size items of that order and
    rank r keeps its own batch_size of them, so ranks never see the same item and together see what
    one process with their combined batch would. The position is a pair (epoch, items handed out)
    that `state_dict` saves, so a resumed run continues with exactly the batches an uninterrupted one
    would have seen. A subclass checks its data, then turns `next_indices()` into tensors."""

    count_key, unit = "n_items", "items of up to"  # how state_dict and its error name the items

    def __init__(self, n_items: int, block_size: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n_items, self.block_size = n_items, block_size
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.position = 0  # items of this epoch's order already handed out, over all ranks
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return self.n_items // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def next_indices(self) -> list[int]:
        """The items of this rank's next batch (a new epoch's order once this one cannot fill a step)."""
        step = self.world_size * self.batch_size
        if self.position + step > self.n_items:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed << 32) + self.epoch)
                self._order = torch.randperm(self.n_items, generator=g)
            else:
                self._order = torch.arange(self.n_items)
            self._order_epoch = self.epoch
        mine = self.position + self.rank * self.batch_size
        self.position += step
        return self._order[mine:mine + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                self.count_key: self.n_items, "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        if (state[self.count_key], state["block_size"]) != (self.n_items, self.block_size):
            raise UserError(
                f"the saved data position is for {state[self.count_key]} {self.unit} {state['block_size']} "
                f"tokens, but this data has {self.n_items} of {self.block_size}: resume with the same dataset, "
                f"tokenizer and block size, or start a new run")
        self.epoch, self.position = state["epoch"], state["position"]
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self._order_epoch = None


class PackedLoader(DrawnBatches):
    """Batches of (x, y) where y is x shifted by one token, the chunks drawn as DrawnBatches draws
    its items (each epoch in its own order, ranks disjoint, the position saved for an exact resume)."""

    count_key, unit = "n_chunks", "chunks of"  # the names its checkpoints have

    def __init__(self, shards: list[str], dtype, batch_size: int, block_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or block_size < 1:
            raise UserError(f"batch size and block size must be positive, not {batch_size} and {block_size}")
        # np.memmap cannot map an empty file, and an empty shard holds nothing anyway
        self._shards = [np.memmap(path, dtype=dtype, mode="r") for path in shards
                        if os.path.getsize(path) > 0]
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
        self.n_tokens = self._offsets[-1]
        n_chunks = max(self.n_tokens - 1, 0) // block_size
        needed = world_size * batch_size * block_size + 1
        if n_chunks < world_size * batch_size:
            raise UserError(
                f"{self.n_tokens} tokens are too few for one batch, which needs {needed} "
                f"({world_size} ranks x batch size {batch_size} x block size {block_size}, + 1): "
                f"use more data or a smaller batch or block size")
        super().__init__(n_chunks, block_size, batch_size, rank, world_size, seed, shuffle)

    @property
    def n_chunks(self) -> int:
        return self.n_items

    def _read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream, across shard edges."""
        pieces = []
        while n > 0:
            i = bisect.bisect_right(self._offsets, start) - 1
            piece = self._shards[i][start - self._offsets[i]:start - self._offsets[i] + n]
            pieces.append(piece)
            start, n = start + len(piece), n - len(piece)
        return np.concatenate(pieces)

    def next_batch(self, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), int64 on the CPU.

        x is (batch_size, block_size); with `seq_len` (a divisor of block_size, for progressive
        sequence length) each chunk is cut into block_size // seq_len rows of seq_len tokens, so
        a batch holds the same tokens in more, shorter rows.
        """
        seq_len = seq_len or self.block_size
        if not 0 < seq_len <= self.block_size or self.block_size % seq_len:
            raise ValueError(f"seq_len {seq_len} does not divide block size {self.block_size}")
        chunks = self.next_indices()
        b = self.block_size
        tokens = torch.from_numpy(np.stack([self._read(c * b, b + 1) for c in chunks]).astype(np.int64))
        x = tokens[:, :-1].reshape(-1, seq_len).contiguous()
        y = tokens[:, 1:].reshape(-1, seq_len).contiguous()
        return x, y
