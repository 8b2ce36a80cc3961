"""Data position as one global sample cursor over seeded per-epoch permutations.

Sample position ``p`` (counted from the start of training) is index ``perm(p // N)[p % N]`` of
the dataset, where ``perm(e)`` is a permutation seeded by (seed, e). An optimizer step consumes
the window ``[cursor, cursor + global_batch)``; a rank reads its contiguous slice of that window.
The cursor, not the rank, decides what is read, so a checkpoint's cursor pins the data position
at any world size, and every index is read exactly once per epoch. Windows may straddle an epoch
boundary, so no sample is dropped.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class GlobalSampler:
    """Maps the global cursor to dataset indices; pure and cheap to rebuild."""

    def __init__(self, *, dataset_size: int, seed: int) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset size must be positive, got {dataset_size}")
        self.dataset_size = dataset_size
        self.seed = seed
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def epoch(self, cursor: int) -> int:
        return cursor // self.dataset_size

    def indices(self, start: int, count: int) -> np.ndarray:
        """Dataset indices at global positions [start, start + count)."""
        if start < 0 or count < 0:
            raise ValueError(f"bad window start={start} count={count}")
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            pos = start + filled
            epoch, offset = divmod(pos, self.dataset_size)
            take = min(count - filled, self.dataset_size - offset)
            out[filled : filled + take] = self._permutation(epoch)[offset : offset + take]
            filled += take
        return out

    def rank_window(self, *, cursor: int, global_batch_size: int, rank: int, world_size: int) -> np.ndarray:
        """The indices rank `rank` reads for the step that starts at `cursor`."""
        per_rank = global_batch_size // world_size
        return self.indices(cursor + rank * per_rank, per_rank)
