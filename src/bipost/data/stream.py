"""Endless, deterministic, resumable micro-batch streams (one per objective), and eval batches.

The scheme (the training loop's equivalence guarantees rest on it):

* The global index sequence is ``perm_0 ++ perm_1 ++ ...`` where ``perm_e`` is
  ``torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))``
  (``range(N)`` when ``shuffle=False``).
* Micro-batch ``k`` on rank ``r`` of ``W`` holds the examples at positions
  ``[(k*W + r)*mbs, (k*W + r + 1)*mbs)`` of that infinite sequence. Positions wrap across
  passes, so the stream never runs out, no example is dropped at a pass boundary, and each
  pass is freshly shuffled.

Because micro-batch ``k`` is a pure function of ``k``, the stream can collate micro-batch
``k + 1`` in a background thread while the trainer runs ``k`` (``prefetch``): the batches, and
the checkpointed state (``consumed``), are exactly those of a stream without prefetching.

Hence an optimizer step made of ``A`` micro-batches on ``W`` ranks consumes the contiguous
positions ``[s*A*W*mbs, (s+1)*A*W*mbs)``: micro 8 x 1 and micro 2 x accumulation 4 see the same
rows per step, and so do 2 ranks x micro 4 and 1 rank x micro 8.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch

_SEED_STRIDE = 1_000_003


class ExampleStream:
    """Micro-batches of one objective's examples for one rank, without end.

    ``collate_fn(list_of_examples) -> batch dict`` (e.g. ``functools.partial(collate_sft, pad_id=...)``).
    ``prefetch``: how many micro-batches to collate ahead in a background thread (0: none). The
    thread runs Python while the trainer's thread waits on the GPU, which takes collation off the
    critical path of a step.
    """

    def __init__(self, examples: Sequence[Any], micro_batch_size: int, collate_fn: Callable[[list], dict],
                 seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, prefetch: int = 0) -> None:
        if not examples:
            raise ValueError("ExampleStream needs at least one example")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.consumed = 0
        """Micro-batches this rank has taken (the same count on every rank)."""
        self._perms: dict[int, Any] = {}  # epoch -> int64 numpy permutation (8 bytes a row, no Python ints)
        self._perm_lock = threading.Lock()  # the collate thread computes indices too
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.prefetch = prefetch
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def _perm(self, epoch: int):
        with self._perm_lock:
            return self._perm_locked(epoch)

    def _perm_locked(self, epoch: int):
        perm = self._perms.get(epoch)
        if perm is None:
            n = len(self.examples)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
                perm = torch.randperm(n, generator=g).numpy()
            else:
                perm = range(n)
            # A micro-batch spans at most a few passes (mbs may exceed N): keep only recent ones.
            for old in [e for e in self._perms if e < epoch - 2]:
                del self._perms[old]
            self._perms[epoch] = perm
        return perm

    def indices(self, k: int) -> list[int]:
        """Example indices of micro-batch ``k`` on this rank."""
        n, mbs = len(self.examples), self.micro_batch_size
        start = (k * self.world_size + self.rank) * mbs
        return [int(self._perm(pos // n)[pos % n]) for pos in range(start, start + mbs)]

    def batch(self, k: int) -> dict:
        """Micro-batch ``k`` of this rank, collated (in the calling thread)."""
        return self.collate_fn([self.examples[i] for i in self.indices(k)])

    def next(self) -> dict:
        """The next micro-batch (collated)."""
        k = self.consumed
        self.consumed += 1
        if not self.prefetch:
            return self.batch(k)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bipost-collate")
        for j in range(k + 1, k + 1 + self.prefetch):
            if j not in self._pending:
                self._pending[j] = self._pool.submit(self.batch, j)
        fut = self._pending.pop(k, None)
        return fut.result() if fut is not None else self.batch(k)

    __next__ = next

    def __iter__(self) -> Iterator[dict]:
        return self

    @property
    def epoch(self) -> float:
        """Passes over the data consumed so far by all ranks together (same value on every rank)."""
        return self.consumed * self.world_size * self.micro_batch_size / len(self.examples)

    def state_dict(self) -> dict:
        """``{"consumed": k, ...}`` plus what :meth:`load_state_dict` checks."""
        return {
            "consumed": self.consumed,
            "num_examples": len(self.examples),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` left off.

        The data (example count), seed and shuffle must match. The micro-batch size and world
        size may differ if the positions consumed so far (``consumed * W * mbs``) are a whole
        number of the new micro-batches (e.g. at an optimizer-step boundary).
        """
        for key, mine in (("num_examples", len(self.examples)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"can't resume the data stream: the checkpoint has {key}={state[key]!r} but this run has "
                    f"{key}={mine!r} (the data, its filtering or the seed changed)"
                )
        mbs = state.get("micro_batch_size", self.micro_batch_size)
        world = state.get("world_size", self.world_size)
        positions = int(state["consumed"]) * mbs * world
        per_batch = self.micro_batch_size * self.world_size
        if positions % per_batch:
            raise ValueError(
                f"can't resume the data stream: {positions} examples were consumed with micro_batch_size={mbs} x "
                f"world_size={world}, which is not a whole number of micro-batches of "
                f"{self.micro_batch_size} x {self.world_size}"
            )
        self.consumed = positions // per_batch
        self._pending.clear()  # collated for the old position (their threads finish harmlessly)


def eval_batches(examples: Sequence[Any], micro_batch_size: int, collate_fn: Callable[[list], dict],
                 rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Every eval example exactly once across ranks, in fixed order: rank ``r`` takes indices
    ``r, r + W, r + 2W, ...`` in micro-batches of ``micro_batch_size`` (the last one may be smaller).

    Ranks may get different numbers of batches (by one) when ``len(examples)`` is not a
    multiple of ``W * micro_batch_size``; reduce metrics after the loop, not per batch.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    mine = range(rank, len(examples), world_size)
    for start in range(0, len(mine), micro_batch_size):
        yield collate_fn([examples[i] for i in mine[start:start + micro_batch_size]])
