"""Who owns what under context parallelism: page shares, sender policies, token splits.

Pure functions over integers (and small int64 tensors for the split plans); no process groups.

* Page shares split a request's pages by request-local position, balanced and contiguous: with
  ``base, rem = divmod(num_pages, cp)`` rank r owns ``[r*base + min(r, rem), +base + (r < rem))``.
* Token splits say which tokens of a sequence a CP rank computes during prefill:
  zigzag cuts L tokens into 2*cp blocks (the first ``L % 2cp`` one longer) and gives rank r blocks
  r and 2cp-1-r; interleave gives token i to rank i % cp.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SenderPolicy", "SplitPlan", "chunk_share", "interleave_split", "page_share",
           "senders_for", "zigzag_split"]


def _check_cp(cp_size, cp_rank=None) -> None:
    if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
        raise ValueError(f"cp_size: expected a positive int, got {cp_size!r}")
    if cp_rank is not None and (not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size):
        raise ValueError(f"cp_rank: expected an int in [0, {cp_size}), got {cp_rank!r}")


def _check_count(value, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what}: expected a non-negative int, got {value!r}")


def page_share(num_pages: int, cp_size: int, cp_rank: int) -> range:
    """Request-local page positions CP rank ``cp_rank`` owns (balanced contiguous split).

    >>> [page_share(10, 4, r) for r in range(4)]
    [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    """
    _check_count(num_pages, "num_pages")
    _check_cp(cp_size, cp_rank)
    base, rem = divmod(num_pages, cp_size)
    start = cp_rank * base + min(cp_rank, rem)
    return range(start, start + base + (cp_rank < rem))


def chunk_share(num_pages: int, cp_size: int, cp_rank: int, chunk_start: int,
                chunk_stop: int) -> range:
    """The rank's page share intersected with one prefill chunk ``[chunk_start, chunk_stop)``.

    May be empty; an empty share still takes part in the transfer (it reports zero bytes).

    >>> [chunk_share(10, 4, r, 0, 4) for r in range(4)]
    [range(0, 3), range(3, 4), range(6, 6), range(8, 8)]
    """
    share = page_share(num_pages, cp_size, cp_rank)
    _check_count(chunk_start, "chunk_start")
    _check_count(chunk_stop, "chunk_stop")
    if not chunk_start <= chunk_stop <= num_pages:
        raise ValueError(f"chunk: expected 0 <= start <= stop <= {num_pages}, "
                         f"got [{chunk_start}, {chunk_stop})")
    start = max(share.start, chunk_start)
    return range(start, max(start, min(share.stop, chunk_stop)))


class SenderPolicy(enum.Enum):
    """Which CP ranks of a prefill group send a request's pages."""

    ALL = "all"  # every CP rank sends its disjoint page share
    RANK0 = "rank0"  # CP rank 0 sends every page; the others complete without bytes
    ROTATE = "rotate"  # one rank per request, rank = request_id % cp_size


def senders_for(policy: SenderPolicy | str, num_pages: int, cp_size: int, cp_rank: int,
                request_id: int = 0) -> range:
    """Request-local pages ``cp_rank`` sends under ``policy`` (empty: it sends no bytes)."""
    policy = SenderPolicy(policy)
    _check_cp(cp_size, cp_rank)
    _check_count(num_pages, "num_pages")
    if policy is SenderPolicy.ALL:
        return page_share(num_pages, cp_size, cp_rank)
    _check_count(request_id, "request_id")
    owner = 0 if policy is SenderPolicy.RANK0 else request_id % cp_size
    return range(num_pages) if cp_rank == owner else range(0)


@dataclass(frozen=True)
class SplitPlan:
    """How a batch of sequences is split across CP ranks, and how to put it back.

    Token positions are global over the batch: sequence s occupies
    ``[sum(seq_lens[:s]), sum(seq_lens[:s+1]))``.

    Attributes:
        kind: "zigzag" or "interleave".
        cp_size: ranks in the group.
        seq_lens: tokens per sequence.
        positions: per rank, the global positions of its local tokens, in local order
            (sequence by sequence).
        padded_len: tokens per rank after padding every shard to the longest (the all-gather
            moves ``cp_size * padded_len`` token rows).
        gather_index: [total tokens] int64; token i sits at row ``gather_index[i]`` of the
            gathered ``[cp_size * padded_len]`` buffer (rank r's shard at rows ``r*padded_len``).
    """

    kind: str
    cp_size: int
    seq_lens: tuple[int, ...]
    positions: tuple[torch.Tensor, ...]
    padded_len: int
    gather_index: torch.Tensor

    @property
    def local_lens(self) -> list[int]:
        return [len(p) for p in self.positions]

    @property
    def total_len(self) -> int:
        return sum(self.seq_lens)

    def block_restore(self) -> list[int]:
        """Zigzag, one sequence: gathered-block index of each sequence block, in order.

        >>> zigzag_split(16, 4).block_restore()
        [0, 2, 4, 6, 7, 5, 3, 1]
        """
        if self.kind != "zigzag" or len(self.seq_lens) != 1:
            raise ValueError("block_restore: defined for a zigzag plan of one sequence")
        cp = self.cp_size
        gathered = [b for r in range(cp) for b in (r, 2 * cp - 1 - r)]
        return [gathered.index(b) for b in range(2 * cp)]


def _seq_lens(seq_lens) -> list[int]:
    lens = [seq_lens] if isinstance(seq_lens, int) else list(seq_lens)
    if not lens:
        raise ValueError("seq_lens: expected at least one sequence, got none")
    for n in lens:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"seq_lens: expected positive ints, got {n!r}")
    return lens


def _plan(kind: str, cp_size: int, lens: list[int], per_seq) -> SplitPlan:
    """Concatenate per-sequence splits into a batch plan and build its gather index."""
    owned: list[list[torch.Tensor]] = [[] for _ in range(cp_size)]
    offset = 0
    for n in lens:
        for r, local in enumerate(per_seq(n)):
            owned[r].append(local + offset)
        offset += n
    positions = tuple(torch.cat(p) for p in owned)
    padded = max(len(p) for p in positions)
    gather_index = torch.empty(offset, dtype=torch.int64)
    for r, p in enumerate(positions):
        gather_index[p] = r * padded + torch.arange(len(p))
    return SplitPlan(kind, cp_size, tuple(lens), positions, padded, gather_index)


def zigzag_split(seq_lens: int | Sequence[int], cp_size: int) -> SplitPlan:
    """Zigzag split: rank r owns blocks r and 2*cp-1-r of each sequence (load-balanced causal).

    Each sequence needs at least 2*cp tokens (one per block); shorter ones raise ValueError —
    run them without CP.

    >>> [p.tolist() for p in zigzag_split(10, 2).positions]
    [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]]
    """
    _check_cp(cp_size)
    lens = _seq_lens(seq_lens)
    for n in lens:
        if n < 2 * cp_size:
            raise ValueError(f"zigzag_split: a sequence of {n} tokens is too short for "
                             f"cp_size {cp_size} (needs >= {2 * cp_size}: one per block)")

    def per_seq(n):
        base, rem = divmod(n, 2 * cp_size)
        starts = [b * base + min(b, rem) for b in range(2 * cp_size + 1)]
        block = [torch.arange(starts[b], starts[b + 1]) for b in range(2 * cp_size)]
        return [torch.cat([block[r], block[2 * cp_size - 1 - r]]) for r in range(cp_size)]

    return _plan("zigzag", cp_size, lens, per_seq)


def interleave_split(seq_lens: int | Sequence[int], cp_size: int) -> SplitPlan:
    """Interleave split: token i of each sequence goes to rank i % cp.

    Each sequence needs at least cp tokens; shorter ones raise ValueError.

    >>> [p.tolist() for p in interleave_split(5, 2).positions]
    [[0, 2, 4], [1, 3]]
    """
    _check_cp(cp_size)
    lens = _seq_lens(seq_lens)
    for n in lens:
        if n < cp_size:
            raise ValueError(f"interleave_split: a sequence of {n} tokens is too short for "
                             f"cp_size {cp_size} (needs >= {cp_size})")
    return _plan("interleave", cp_size, lens,
                 lambda n: [torch.arange(r, n, cp_size) for r in range(cp_size)])
