"""Who owns what under context parallelism: page shares, sender policies, token splits.

Pure functions over integers (and small int64 tensors for the split plans); no process groups.

* Page shares split a request's pages by request-local position, balanced and contiguous: with
  ``base, rem = divmod(num_pages, cp)`` rank r owns ``[r*base + min(r, rem), +base + (r < rem))``.
* Token splits say which tokens of a batch a CP rank computes during prefill, in the order its
  local K/V rows come out of the model (the order SGLang uses, by default):
  zigzag cuts each sequence of L tokens into 2*cp blocks (the first ``L % 2cp`` one longer) and
  gives rank r block r of every sequence, then block 2cp-1-r of every sequence; interleave gives
  global token i of the concatenated batch to rank i % cp. ``order="sequence"`` keeps each
  sequence's share together instead; `SplitPlan.from_positions` describes any other split.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import check_count, is_index, is_int
from ..parallel import balanced_split

__all__ = ["SenderPolicy", "SplitPlan", "chunk_share", "interleave_split", "page_share",
           "pages_sent_by", "zigzag_split"]


MAX_CP_SIZE = 1 << 16  # far above any CP group; bounds the per-rank bookkeeping of a split
MAX_SPLIT_TOKENS = (1 << 31) - 1  # a batch's tokens: kernels index tokens in 32 bits


def _check_cp(cp_size, cp_rank=None) -> None:
    if not is_int(cp_size) or cp_size < 1:
        raise ValueError(f"cp_size: expected a positive int, got {cp_size!r}")
    if cp_size > MAX_CP_SIZE:
        raise ValueError(f"cp_size: expected at most {MAX_CP_SIZE} ranks, got {cp_size}")
    if cp_rank is not None and (not is_int(cp_rank) or not 0 <= cp_rank < cp_size):
        raise ValueError(f"cp_rank: expected an int in [0, {cp_size}), got {cp_rank!r}")


def page_share(num_pages: int, cp_size: int, cp_rank: int) -> range:
    """Request-local page positions CP rank ``cp_rank`` owns (balanced contiguous split).

    >>> [page_share(10, 4, r) for r in range(4)]
    [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    """
    check_count(num_pages, "num_pages")
    _check_cp(cp_size, cp_rank)
    return balanced_split(num_pages, cp_size, cp_rank)


def chunk_share(num_pages: int, cp_size: int, cp_rank: int, chunk_start: int,
                chunk_stop: int, *, policy: SenderPolicy | str = "all",
                request_id: int = 0) -> range:
    """The pages the rank sends of one prefill chunk ``[chunk_start, chunk_stop)``: its share
    under the sender ``policy`` (`pages_sent_by`; default its balanced `page_share`) intersected
    with the chunk.

    May be empty; an empty share still takes part in the transfer (it reports zero bytes).

    >>> [chunk_share(10, 4, r, 0, 4) for r in range(4)]
    [range(0, 3), range(3, 4), range(6, 6), range(8, 8)]
    """
    share = pages_sent_by(policy, num_pages, cp_size, cp_rank, request_id)
    check_count(chunk_start, "chunk_start")
    check_count(chunk_stop, "chunk_stop")
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


def pages_sent_by(policy: SenderPolicy | str, num_pages: int, cp_size: int, cp_rank: int,
                  request_id: int = 0) -> range:
    """Request-local pages ``cp_rank`` sends under ``policy`` (empty: it sends no bytes)."""
    policy = SenderPolicy(policy)
    _check_cp(cp_size, cp_rank)
    check_count(num_pages, "num_pages")
    if policy is SenderPolicy.ALL:
        return page_share(num_pages, cp_size, cp_rank)
    check_count(request_id, "request_id")
    owner = 0 if policy is SenderPolicy.RANK0 else request_id % cp_size
    return range(num_pages) if cp_rank == owner else range(0)


senders_for = pages_sent_by  # the former name (it returns pages, not senders)


@dataclass(frozen=True)
class SplitPlan:
    """How a batch of sequences is split across CP ranks, and how to put it back.

    Token positions are global over the batch: sequence s occupies
    ``[sum(seq_lens[:s]), sum(seq_lens[:s+1]))``.

    Attributes:
        kind: "zigzag", "interleave" or "custom" (`from_positions`).
        cp_size: ranks in the group.
        seq_lens: tokens per sequence.
        positions: per rank, the global positions of its local tokens, in local order (the
            order of the rank's K/V rows).
        padded_len: tokens per rank after padding every shard to the longest (the all-gather
            moves ``cp_size * padded_len`` token rows).
        gather_index: [total tokens] int64; token i sits at row ``gather_index[i]`` of the
            gathered ``[cp_size * padded_len]`` buffer (rank r's shard at rows ``r*padded_len``).
        order: "batch" (SGLang's), "sequence", or "custom".
    """

    kind: str
    cp_size: int
    seq_lens: tuple[int, ...]
    positions: tuple[torch.Tensor, ...]
    padded_len: int
    gather_index: torch.Tensor
    order: str = "batch"

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

    @classmethod
    def from_positions(cls, per_rank_positions: Sequence, seq_lens: int | Sequence[int]
                       ) -> SplitPlan:
        """A plan for any runner's split: rank r's local rows are global tokens
        ``per_rank_positions[r]`` (lists, numpy arrays or int tensors), in that order.

        Together they must be a permutation of the batch's ``sum(seq_lens)`` tokens.

        >>> SplitPlan.from_positions([[0, 3], [1, 2]], [4]).gather_index.tolist()
        [0, 2, 3, 1]
        """
        lens = _seq_lens(seq_lens)
        if isinstance(per_rank_positions, (str, bytes)) or \
                not isinstance(per_rank_positions, (Sequence, np.ndarray, torch.Tensor)):
            raise TypeError(f"per_rank_positions: expected one sequence of positions per rank, "
                            f"got {type(per_rank_positions).__name__}")
        cp = len(per_rank_positions)
        _check_cp(cp)
        arrays = []
        for r, p in enumerate(per_rank_positions):
            if isinstance(p, torch.Tensor):
                p = p.detach().cpu().numpy()
            a = np.asarray(p)
            if a.size == 0:
                a = a.astype(np.int64).reshape(0)
            if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
                raise ValueError(f"per_rank_positions[{r}]: expected a 1-D sequence of ints, "
                                 f"got dtype {a.dtype} shape {a.shape}")
            arrays.append(a.astype(np.int64))
        total = sum(lens)
        flat = np.concatenate(arrays)
        seen = np.bincount(flat[(flat >= 0) & (flat < total)], minlength=total)
        if flat.size != total or flat.min(initial=0) < 0 or flat.max(initial=0) >= total \
                or not (seen == 1).all():
            missing = np.flatnonzero(seen == 0)[:5].tolist()
            extra = sorted(set(flat[(flat < 0) | (flat >= total)].tolist()) |
                           set(np.flatnonzero(seen > 1).tolist()))[:5]
            raise ValueError(f"per_rank_positions: expected a permutation of the batch's "
                             f"{total} tokens, got {flat.size} positions (missing {missing}, "
                             f"out of range or repeated {extra})")
        return _build("custom", cp, lens, arrays, "custom")


def _seq_lens(seq_lens) -> list[int]:
    lens = [seq_lens] if is_int(seq_lens) else list(seq_lens)
    if not lens:
        raise ValueError("seq_lens: expected at least one sequence, got none")
    for n in lens:
        if not is_index(n) or n < 1:
            raise ValueError(f"seq_lens: expected positive ints, got {n!r}")
    if sum(int(n) for n in lens) > MAX_SPLIT_TOKENS:
        raise ValueError(f"seq_lens: expected at most {MAX_SPLIT_TOKENS} tokens in a batch, got "
                         f"{sum(int(n) for n in lens)}")
    return [int(n) for n in lens]


def _build(kind: str, cp_size: int, lens: list[int], per_rank: list[np.ndarray],
           order: str) -> SplitPlan:
    padded = max(len(p) for p in per_rank)
    total = sum(lens)
    flat = np.concatenate(per_rank)
    rows = np.concatenate([r * padded + np.arange(len(p)) for r, p in enumerate(per_rank)])
    gather_index = np.empty(total, dtype=np.int64)
    gather_index[flat] = rows
    positions = tuple(torch.from_numpy(np.ascontiguousarray(p, dtype=np.int64))
                      for p in per_rank)
    return SplitPlan(kind, cp_size, tuple(lens), positions, padded,
                     torch.from_numpy(gather_index), order)


def _by_rank(cp_size: int, rank: np.ndarray, *keys: np.ndarray) -> list[np.ndarray]:
    """Global positions grouped by owning rank, each rank's sorted by ``keys`` (last first)."""
    idx = np.lexsort((*keys, rank))  # np.lexsort: the last key is the primary one
    counts = np.bincount(rank, minlength=cp_size)
    return np.split(idx.astype(np.int64), np.cumsum(counts)[:-1])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` pieces, without a Python loop."""
    total = int(lengths.sum())
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return shift + np.arange(total, dtype=np.int64)


def _check_order(order) -> None:
    if order not in ("batch", "sequence"):
        raise ValueError(f"order: expected 'batch' (SGLang's) or 'sequence', got {order!r}")


def _seq_index(lens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position within it) of every global token."""
    seq = np.repeat(np.arange(len(lens)), lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return seq, np.arange(sum(lens)) - starts[seq]


def zigzag_split(seq_lens: int | Sequence[int], cp_size: int, *,
                 order: str = "batch") -> SplitPlan:
    """Zigzag split: rank r owns blocks r and 2*cp-1-r of each sequence (load-balanced causal).

    Each sequence is cut into 2*cp blocks, the first ``L % 2cp`` one token longer. With
    ``order="batch"`` (SGLang's ``prepare_context_parallel_metadata``) rank r's rows are block
    r of every sequence, then block 2cp-1-r of every sequence; ``order="sequence"`` keeps each
    sequence's two blocks together. Each sequence needs at least 2*cp tokens (SGLang's
    ``can_cp_split``); shorter ones raise ValueError — run them without CP.

    >>> [p.tolist() for p in zigzag_split([8, 8], 2).positions][0]
    [0, 1, 8, 9, 6, 7, 14, 15]
    >>> [p.tolist() for p in zigzag_split(10, 2).positions]
    [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]]
    """
    _check_cp(cp_size)
    _check_order(order)
    lens = _seq_lens(seq_lens)
    for n in lens:
        if n < 2 * cp_size:
            raise ValueError(f"zigzag_split: a sequence of {n} tokens is too short for "
                             f"cp_size {cp_size} (needs >= {2 * cp_size}: one per block)")
    cp2 = 2 * cp_size
    n = np.asarray(lens, dtype=np.int64)
    sizes = n[:, None] // cp2 + (np.arange(cp2)[None, :] < (n % cp2)[:, None])  # [seqs, 2cp]
    seq_start = np.concatenate([[0], np.cumsum(n)[:-1]])
    starts = seq_start[:, None] + np.cumsum(sizes, axis=1) - sizes  # global block starts
    ranks = np.arange(cp_size)[:, None, None]
    seqs = np.arange(len(lens))[None, None, :]
    blocks = np.concatenate([np.broadcast_to(ranks, (cp_size, 1, len(lens))),
                             np.broadcast_to(cp2 - 1 - ranks, (cp_size, 1, len(lens)))], axis=1)
    seqs = np.broadcast_to(seqs, blocks.shape)  # [rank, half, seq]
    if order == "sequence":  # [rank, seq, half]
        blocks, seqs = blocks.transpose(0, 2, 1), seqs.transpose(0, 2, 1)
    piece_start = starts[seqs, blocks].reshape(cp_size, -1)
    piece_len = sizes[seqs, blocks].reshape(cp_size, -1)
    return _build("zigzag", cp_size, lens, [_ranges(a, b) for a, b in zip(
        piece_start, piece_len, strict=True)], order)


def interleave_split(seq_lens: int | Sequence[int], cp_size: int, *,
                     order: str = "batch") -> SplitPlan:
    """Interleave (round-robin) split.

    ``order="batch"`` (SGLang's round-robin split): global token i of the concatenated batch
    goes to rank i % cp, so sequences need no minimum length (SGLang pads the batch to a
    multiple of cp; those padding rows are ignored by `all_gather_kv`). ``order="sequence"``:
    token i of each sequence goes to rank i % cp, and each sequence needs at least cp tokens.

    >>> [p.tolist() for p in interleave_split(5, 2).positions]
    [[0, 2, 4], [1, 3]]
    >>> [p.tolist() for p in interleave_split([1, 5], 2).positions]
    [[0, 2, 4], [1, 3, 5]]
    """
    _check_cp(cp_size)
    _check_order(order)
    lens = _seq_lens(seq_lens)
    if order == "batch":
        total = sum(lens)
        return _build("interleave", cp_size, lens,
                      [np.arange(r, total, cp_size, dtype=np.int64) for r in range(cp_size)],
                      order)
    seq, pos = _seq_index(lens)
    for n in lens:
        if n < cp_size:
            raise ValueError(f"interleave_split: a sequence of {n} tokens is too short for "
                             f"cp_size {cp_size} (needs >= {cp_size})")
    return _build("interleave", cp_size, lens,
                  _by_rank(cp_size, pos % cp_size, np.arange(sum(lens))), order)
