"""Parallel coordinates (dp/cp/tp/pp), decode context parallelism (DCP), and the split
arithmetic every other module uses.

Pure integers: no process groups, no control plane, and no tensors except where
`DcpSelection.tensors` builds index tensors (torch is imported there, not here). Two types:

* `ParallelRank`: where one rank sits (its dp, cp, tp and pp indices). Its ``key`` names it on
  the control plane and in sender ids.
* `ParallelSizes`: how many ranks a deployment has along each axis.

and the arithmetic that decides who holds what:

* `balanced_split`: the balanced contiguous split. ``n`` items over ``parts``: with
  ``base, rem = divmod(n, parts)`` part i owns ``[i*base + min(i, rem), +base + (i < rem))``.
  CP page shares and PP layer stages are both this split.
* `heads_of` / `head_shard` / `is_first_holder`: KV heads under tensor parallelism. With
  ``tp <= H`` (H KV heads, a multiple of tp) rank t holds heads ``[t*H/tp, (t+1)*H/tp)``; with
  ``tp > H`` (a multiple of H) each rank holds one head, ``t * H // tp``, so ``tp / H``
  consecutive ranks replicate it and the first of them is its *first holder*.
* `layers_of`: the layers a PP stage holds (balanced contiguous).
* `layer_groups`: consecutive layer ranges of at least ``min_nbytes`` each (or one layer), the
  unit a packed send writes and a CP gather gathers in turn.

and decode context parallelism, where a decode group shards each request by token
(see `DcpLayout` and docs/dcp.md):

* `DcpLayout`: which DCP rank holds request token t, and at which index of that rank's compact
  token sequence (its pages).
* `dcp_select` / `DcpSelection`: the tokens of a request range (a prefill CP rank's page share,
  `tokens_of_pages`) that one DCP rank takes from one source, their source positions and
  destination indices, as ints or as index tensors built on the device.
* `dcp_rank_of` / `dcp_heads_of`: a TP rank's place in its DCP group, and the KV heads it holds.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, replace
from functools import lru_cache

__all__ = ["LAYER_GROUP_BYTES", "DcpLayout", "DcpSelection", "ParallelRank", "ParallelSizes",
           "balanced_split", "dcp_heads_of", "dcp_rank_of", "dcp_select", "head_shard",
           "heads_of", "is_first_holder", "layer_groups", "layers_of", "tokens_of_pages"]

LAYER_GROUP_BYTES = 16 << 20  # layer groups of at least this size are moved in turn

AXES = ("dp", "cp", "tp", "pp")


# The int checks every cpkv module shares live here, at the bottom of the import graph: this
# module imports nothing of cpkv (pure integers, importable anywhere), so whatever it checks with
# must be defined in it; `cpkv._checks` re-exports them for every other module.

def is_int(value) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to cpkv)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(value, what: str, lowest: int = 0) -> int:
    """``value`` if it is an int (not a bool) of at least ``lowest`` (0 or 1), else a
    ValueError naming ``what``."""
    if not is_int(value) or value < lowest:
        kind = "non-negative" if lowest == 0 else "positive" if lowest == 1 else f">= {lowest}"
        raise ValueError(f"{what}: expected a {kind} int, got {value!r}")
    return value


def check_index(value, what: str, size: int) -> int:
    """``value`` if it is an int (not a bool) in ``[0, size)``, else a ValueError naming
    ``what``."""
    if not is_int(value) or not 0 <= value < size:
        raise ValueError(f"{what}: expected an int in [0, {size}), got {value!r}")
    return value


def _check_axes(obj, lowest: int) -> None:
    for a in AXES:
        check_count(getattr(obj, a), a, lowest)


@dataclass(frozen=True)
class ParallelRank:
    """One rank's coordinates: its index along each parallel axis (all default 0).

    >>> ParallelRank(cp=1, tp=2).key
    'dp0.cp1.tp2.pp0'
    """

    dp: int = 0
    cp: int = 0
    tp: int = 0
    pp: int = 0

    def __post_init__(self):
        _check_axes(self, 0)

    @property
    def key(self) -> str:
        """The rank's name on the control plane: every coordinate, e.g. ``dp0.cp1.tp0.pp0``."""
        return ".".join(f"{a}{getattr(self, a)}" for a in AXES)

    def __repr__(self) -> str:
        return f"ParallelRank({self.key})"


@dataclass(frozen=True)
class ParallelSizes:
    """One deployment's parallel sizes: ranks along each axis (all default 1).

    >>> ParallelSizes(cp=2, tp=4).check(ParallelRank(cp=1, tp=3))
    >>> ParallelSizes(tp=4).check(ParallelRank(tp=4))
    Traceback (most recent call last):
    ...
    ValueError: tp: expected 0 <= rank < size, got rank 4, size 4
    """

    dp: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        _check_axes(self, 1)

    def check(self, rank: ParallelRank) -> None:
        """Raise ValueError naming the first axis where ``rank`` lies outside these sizes."""
        if not isinstance(rank, ParallelRank):
            raise TypeError(f"rank: expected a ParallelRank, got {type(rank).__name__}")
        for a in AXES:
            r, s = getattr(rank, a), getattr(self, a)
            if r >= s:
                raise ValueError(f"{a}: expected 0 <= rank < size, got rank {r}, size {s}")

    def ranks(self) -> list[ParallelRank]:
        """Every rank of the deployment, dp-major then cp, tp, pp (pp fastest)."""
        return [ParallelRank(d, c, t, p) for d in range(self.dp) for c in range(self.cp)
                for t in range(self.tp) for p in range(self.pp)]


def balanced_split(n: int, parts: int, index: int) -> range:
    """Part ``index`` of ``n`` items split into ``parts`` balanced contiguous ranges (the first
    ``n % parts`` one longer). Trusts its inputs: callers validate.

    >>> [balanced_split(10, 4, i) for i in range(4)]
    [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    """
    base, rem = divmod(n, parts)
    start = index * base + min(index, rem)
    return range(start, start + base + (index < rem))


def heads_of(tp_rank: int, tp_size: int, num_kv_heads: int) -> range:
    """Global KV heads a TP rank holds (see the module doc).

    >>> heads_of(1, 2, 8), heads_of(3, 4, 2)
    (range(4, 8), range(1, 2))
    """
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads: expected >= 1, got {num_kv_heads}")
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise ValueError(f"num_kv_heads {num_kv_heads} is not divisible by tp {tp_size}")
        per = num_kv_heads // tp_size
        return range(tp_rank * per, (tp_rank + 1) * per)
    if tp_size % num_kv_heads:
        raise ValueError(f"tp {tp_size} is not a multiple of num_kv_heads {num_kv_heads}")
    head = tp_rank * num_kv_heads // tp_size
    return range(head, head + 1)


def head_shard(tp_rank: int, tp_size: int, num_kv_heads: int) -> int:
    """Index of the distinct head range a TP rank holds; replicas of one head share it.

    >>> [head_shard(t, 4, 2) for t in range(4)]
    [0, 0, 1, 1]
    """
    heads = heads_of(tp_rank, tp_size, num_kv_heads)
    return heads.start // len(heads)


def is_first_holder(tp_rank: int, tp_size: int, num_kv_heads: int) -> bool:
    """Whether no lower TP rank holds the same heads (the replica that sends or writes them).

    >>> [is_first_holder(t, 4, 2) for t in range(4)]
    [True, False, True, False]
    """
    heads = heads_of(tp_rank, tp_size, num_kv_heads)
    return tp_rank == 0 or heads_of(tp_rank - 1, tp_size, num_kv_heads) != heads


def layers_of(pp_rank: int, pp_size: int, num_layers: int) -> range:
    """Global layers a PP stage holds (balanced contiguous).

    >>> [layers_of(s, 2, 5) for s in range(2)]
    [range(0, 3), range(3, 5)]
    """
    if num_layers < pp_size:
        raise ValueError(f"num_layers {num_layers} is fewer than pp {pp_size} stages")
    return balanced_split(num_layers, pp_size, pp_rank)


def layer_groups(layers: int | range, layer_nbytes: int,
                 min_nbytes: int = LAYER_GROUP_BYTES) -> list[range]:
    """Cut ``layers`` (a count, meaning ``range(layers)``, or a range) into consecutive groups of
    at least ``min_nbytes`` each, given the bytes one layer moves; a group is one layer where a
    layer alone is that big, and the last group may be smaller.

    >>> layer_groups(5, 3 << 20, 8 << 20)
    [range(0, 3), range(3, 5)]
    >>> layer_groups(range(2, 4), 64 << 20)
    [range(2, 3), range(3, 4)]
    """
    r = range(layers) if is_int(layers) else layers
    step = max(1, -(-min_nbytes // max(layer_nbytes, 1)))
    return [range(l0, min(l0 + step, r.stop)) for l0 in range(r.start, r.stop, step)]


# -- decode context parallelism (DCP) ------------------------------------------------------------
#
# Where this follows the runners (read at vLLM 0.32.0 and 0.21.0, SGLang 0.5.23; docs/dcp.md):
# vllm/v1/worker/block_table.py `_compute_slot_mapping_kernel` (rank and local offset inside a
# "virtual block" of page_size * D tokens; equal to the closed forms below when I divides the
# page size), vllm/v1/attention/backends/utils.py `get_dcp_local_seq_lens` (the count), and
# sglang/srt/layers/dcp/layout.py `get_dcp_lens` / `localize_dcp_indices` (the same arithmetic
# with an interleave size).


@dataclass(frozen=True)
class DcpLayout:
    """Where one rank of a decode context-parallel (DCP) group keeps a request's tokens.

    With DCP size D, interleave I (vLLM's ``cp_kv_cache_interleave_size``; SGLang's CUDA path
    uses 1) and page size B, request token t lives on DCP rank ``(t // I) % D``, at index
    ``(t // (I*D)) * I + t % I`` of that rank's compact token sequence; local index j is entry
    ``j % B`` of page ``page_ids[j // B]``, and the page ids are the same on every rank of the
    group (vLLM shares one block table; a request holds ``ceil(N / (B*D))`` pages on each rank).

    Args:
        size: D, the ranks of the DCP group (1: no DCP, every token on rank 0).
        rank: r, this rank's index in the group, in ``[0, D)``.
        interleave: I, consecutive tokens a rank takes per turn (default 1; vLLM's NixlConnector
            sets it to the page size, TRT-LLM Helix places whole pages: I = B).
        page_size: B, when pages matter (`place_of`, `num_pages`); I must divide it, as vLLM
            requires: otherwise a rank's tokens would outgrow the shared page list.

    The arithmetic methods trust their arguments (non-negative ints, or int64 tensors: they
    use only ``//``, ``%``, ``*`` and ``+``). Worked example, a 10-token request over D = 2,
    I = 2, B = 2 (rank, page index, entry per token; rank 0 holds 6 tokens in 3 pages, rank 1
    holds 4 in 2):

    >>> lay = DcpLayout(size=2, interleave=2, page_size=2)
    >>> [lay.place_of(t) for t in range(10)]  # doctest: +NORMALIZE_WHITESPACE
    [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1),
     (0, 2, 0), (0, 2, 1)]
    >>> [r.count(10) for r in lay.ranks()], lay.num_pages(10)
    ([6, 4], 3)
    >>> [lay.with_rank(1).global_of(j) for j in range(4)]
    [2, 3, 6, 7]
    """

    size: int = 1
    rank: int = 0
    interleave: int = 1
    page_size: int | None = None

    def __post_init__(self):
        check_count(self.size, "dcp size", 1)
        check_count(self.interleave, "interleave", 1)
        check_index(self.rank, "dcp rank", self.size)
        if self.page_size is not None:
            check_count(self.page_size, "page_size", 1)
            if self.page_size % self.interleave:
                raise ValueError(f"interleave: expected a divisor of page_size {self.page_size}, "
                                 f"got {self.interleave}")

    @classmethod
    def from_pcp(cls, *, pcp_size: int, pcp_rank: int, dcp_size: int, dcp_rank: int,
                 interleave: int = 1, page_size: int | None = None) -> DcpLayout:
        """The layout of a runner that shards KV over PCP x DCP ranks, as vLLM up to 0.21 does
        (vllm/v1/worker/block_table.py ``compute_slot_mapping``: ``pcp_size * dcp_size`` ranks,
        rank ``pcp_rank * dcp_size + dcp_rank``). vLLM 0.32 replicates KV over PCP instead and
        shards by DCP alone (with `dcp_rank_of` placing the rank in a group that may span PCP).

        >>> DcpLayout.from_pcp(pcp_size=2, pcp_rank=1, dcp_size=2, dcp_rank=0)
        DcpLayout(size=4, rank=2, interleave=1, page_size=None)
        """
        check_count(pcp_size, "pcp size", 1)
        check_count(dcp_size, "dcp size", 1)
        check_index(pcp_rank, "pcp rank", pcp_size)
        check_index(dcp_rank, "dcp rank", dcp_size)
        return cls(pcp_size * dcp_size, pcp_rank * dcp_size + dcp_rank, interleave, page_size)

    @property
    def cycle(self) -> int:
        """I * D: tokens in one turn of the whole group."""
        return self.interleave * self.size

    def with_rank(self, rank: int) -> DcpLayout:
        """The same layout seen from another rank of the group."""
        return replace(self, rank=rank)

    def ranks(self) -> list[DcpLayout]:
        """Every rank of the group, in rank order."""
        return [self.with_rank(r) for r in range(self.size)]

    def rank_of(self, t):
        """The DCP rank holding request token t: ``(t // I) % D``."""
        return (t // self.interleave) % self.size

    def owns(self, t):
        """Whether this rank holds token t."""
        return self.rank_of(t) == self.rank

    def local_of(self, t):
        """Token t's index on the rank that holds it: ``(t // (I*D)) * I + t % I``. For a token
        of this rank it equals ``count(t)``, the number of this rank's tokens before it."""
        return (t // self.cycle) * self.interleave + t % self.interleave

    def global_of(self, j):
        """The request token at local index j of this rank (the inverse of `local_of`)."""
        i = self.interleave
        return (j // i) * self.cycle + self.rank * i + j % i

    def count(self, n: int) -> int:
        """How many of tokens ``[0, n)`` this rank holds:
        ``(n // (I*D)) * I + clip(n % (I*D) - r*I, 0, I)``."""
        i = self.interleave
        return (n // self.cycle) * i + min(max(n % self.cycle - self.rank * i, 0), i)

    def _pages(self) -> int:
        if self.page_size is None:
            raise ValueError("page_size: expected an int for page arithmetic, got None")
        return self.page_size

    def place_of(self, t: int) -> tuple[int, int, int]:
        """``(rank, page index, entry)`` of token t: the page is an index into the request's
        page ids (the same list on every rank), the entry the position inside the page."""
        page, entry = divmod(self.local_of(t), self._pages())
        return self.rank_of(t), page, entry

    slot_of = place_of  # the former name ("slot" now means a staging slot only)

    def num_pages(self, n: int) -> int:
        """Pages a request of n tokens holds on every rank: ``ceil(n / (B*D))``, as vLLM sizes
        its block table (``cdiv(max_model_len, block_size * dcp_world_size)``); rank 0, the
        fullest, needs them all."""
        per = self._pages() * self.size
        return -(-n // per)


def tokens_of_pages(pages: range, page_size: int, num_tokens: int) -> range:
    """The request tokens in request-local pages ``pages`` of a request of ``num_tokens`` tokens
    (a prefill CP rank's page share, in tokens).

    >>> tokens_of_pages(range(2, 4), 16, 40)
    range(32, 40)
    """
    return range(min(pages.start * page_size, num_tokens), min(pages.stop * page_size, num_tokens))


@lru_cache(maxsize=256)
def _common_pattern(src: tuple[int, int, int], dst: tuple[int, int, int]) -> tuple[int, tuple]:
    """Period L and the sorted offsets in [0, L) that both (size, rank, interleave) ranks hold."""
    (ns, rs, i_s), (nd, rd, i_d) = src, dst
    period = math.lcm(ns * i_s, nd * i_d)
    return period, tuple(o for o in range(period)
                         if (o // i_s) % ns == rs and (o // i_d) % nd == rd)


@dataclass(frozen=True)
class DcpSelection:
    """The tokens of request range ``[start, stop)`` that the ``dst`` rank takes from one source,
    in token order; made by `dcp_select`.

    The source is ``src``: None for a pool holding the request's tokens contiguously (token t at
    position t: page ``t // B``, entry ``t % B`` of the source's page list), or one rank of a
    DCP group (token t at position ``src.local_of(t)``, where that rank holds it). The selected
    tokens are those the destination rank holds that the source holds too; their destination
    indices are ``dst.local_of(t)``, absolute in the rank's compact sequence.

    Attributes:
        dst, src: the two layouts.
        start, stop: the request tokens considered (the prefix already cached is cut off).
        count: tokens selected.
        dst_start: destination index of the first (``dst.count(start)`` when none).
        dst_contiguous: whether the destination indices are ``range(dst_start, +count)``.
            Always so for a contiguous source: ``local_of`` numbers a rank's tokens
            consecutively (it equals the count of the rank's tokens before t), and every
            destination token of the range is selected. A DCP source holds only part of them
            unless each destination rank's tokens all live on one source rank: the source is
            one rank, or (for interleaves that divide one another, as divisors of a page size
            of 2^k do) the destination interleave divides the source's, ``m = I_src / I_dst``,
            and ``m * D_src`` divides ``D_dst`` (DCP 2 -> 4 at one interleave, say); otherwise
            (DCP 4 -> 2, N -> 1) the destination needs the index list, not an offset.
    """

    dst: DcpLayout
    src: DcpLayout | None
    start: int
    stop: int
    count: int
    dst_start: int
    dst_contiguous: bool

    def _candidates(self) -> range:
        """Destination indices of every destination token in ``[start, stop)``."""
        return range(self.dst.count(self.start), self.dst.count(self.stop))

    def tokens(self) -> list[int]:
        """The selected request tokens, ascending."""
        got = (self.dst.global_of(j) for j in self._candidates())
        return list(got) if self.src is None else [t for t in got if self.src.owns(t)]

    def src_positions(self) -> list[int]:
        """Where the source holds each selected token (its position in the source's pages)."""
        ts = self.tokens()
        return ts if self.src is None else [self.src.local_of(t) for t in ts]

    def dst_positions(self) -> list[int]:
        """The destination index of each selected token."""
        return [self.dst.local_of(t) for t in self.tokens()]

    def tensors(self, device=None, *, src_base: int = 0, dst_base: int = 0):
        """``(src_positions, dst_positions)`` as [count] int64 tensors on ``device``, less
        ``src_base`` / ``dst_base`` (a sender passing only its share's pages subtracts the share's
        first token). Built by torch ops from host ints (arange, arithmetic, a cumsum and a
        scatter to compact a DCP source's part): no host synchronisation, whatever the device.
        """
        import torch

        cand = self._candidates()
        j = torch.arange(cand.start, cand.stop, dtype=torch.int64, device=device)
        t = self.dst.global_of(j)
        if self.src is not None:
            if self.count < len(cand):
                keep = self.src.owns(t)
                index = torch.where(keep, torch.cumsum(keep, 0) - 1, self.count)
                both = torch.stack((t, j))
                out = torch.empty((2, self.count + 1), dtype=torch.int64, device=device)
                out.scatter_(1, index.expand(2, -1), both)  # rows not kept land past the end
                t, j = out[0, :self.count], out[1, :self.count]
            t = self.src.local_of(t)
        return t - src_base, j - dst_base


def dcp_select(dst: DcpLayout, start: int, stop: int, *, src: DcpLayout | None = None,
               prefix: int = 0) -> DcpSelection:
    """The tokens of request range ``[start, stop)`` that DCP rank ``dst`` takes from ``src``.

    Args:
        dst: the destination rank's layout.
        start, stop: request tokens, e.g. a prefill CP rank's page share
            (`tokens_of_pages`), or ``[0, N)`` for a whole DCP source rank.
        src: None when the source pool holds the request's tokens contiguously (a prefill
            pool); a `DcpLayout` for a DCP-sharded source (decode DCP N -> M, N -> 1).
        prefix: the request's first ``prefix`` tokens are already in the destination pool
            (a prefix-cache hit): they are not selected, and indices stay absolute, so the
            first new token of the rank lands at index ``dst.count(prefix)`` or later.

    Count, first index and contiguity are closed forms (O(1) for a contiguous source, one
    period ``lcm(I_src*D_src, I_dst*D_dst)`` cached per pair of ranks otherwise); the
    positions are built on demand (`DcpSelection.tensors`, or as lists).

    >>> sel = dcp_select(DcpLayout(size=2, rank=1, interleave=2), 3, 10)
    >>> sel.tokens(), sel.src_positions(), sel.dst_start, sel.count
    ([3, 6, 7], [3, 6, 7], 1, 3)
    >>> two_to_one = dcp_select(DcpLayout(), 0, 6, src=DcpLayout(size=2, rank=1))
    >>> two_to_one.src_positions(), two_to_one.dst_positions(), two_to_one.dst_contiguous
    ([0, 1, 2], [1, 3, 5], False)
    """
    if not isinstance(dst, DcpLayout):
        raise TypeError(f"dst: expected a DcpLayout, got {type(dst).__name__}")
    if src is not None and not isinstance(src, DcpLayout):
        raise TypeError(f"src: expected a DcpLayout or None, got {type(src).__name__}")
    for name, value in (("start", start), ("stop", stop), ("prefix", prefix)):
        check_count(value, name, 0)
    if start > stop:
        raise ValueError(f"token range: expected start <= stop, got [{start}, {stop})")
    start = min(max(start, prefix), stop)
    j0, j1 = dst.count(start), dst.count(stop)
    if src is None:
        return DcpSelection(dst, None, start, stop, j1 - j0, j0, True)
    period, pattern = _common_pattern((src.size, src.rank, src.interleave),
                                      (dst.size, dst.rank, dst.interleave))

    def before(x: int) -> int:  # common tokens in [0, x)
        return (x // period) * len(pattern) + bisect_left(pattern, x % period)

    def kth(k: int) -> int:  # the k-th common token
        return (k // len(pattern)) * period + pattern[k % len(pattern)]

    k0 = before(start)
    count = before(stop) - k0
    if not count:
        return DcpSelection(dst, src, start, stop, 0, j0, True)
    first, last = dst.local_of(kth(k0)), dst.local_of(kth(k0 + count - 1))
    return DcpSelection(dst, src, start, stop, count, first, last - first + 1 == count)


def dcp_rank_of(tp_rank: int, dcp_size: int, *, pcp_size: int = 1, pcp_rank: int = 0) -> int:
    """A TP rank's index in its DCP group. Without PCP, DCP groups are runs of consecutive TP
    ranks (vLLM vllm/distributed/parallel_state.py ``all_ranks.reshape(-1, dcp)``; SGLang
    sglang/srt/distributed/parallel_state.py slices each TP group), so it is ``tp_rank % D``.
    vLLM 0.32 lets a DCP group span PCP (D = pcp or tp * pcp), PCP ranks fastest: rank
    ``(tp_rank * pcp_size + pcp_rank) % D``.

    >>> [dcp_rank_of(t, 2) for t in range(4)], dcp_rank_of(1, 4, pcp_size=2, pcp_rank=1)
    ([0, 1, 0, 1], 3)
    """
    check_count(tp_rank, "tp rank", 0)
    check_count(dcp_size, "dcp size", 1)
    check_count(pcp_size, "pcp size", 1)
    check_index(pcp_rank, "pcp rank", pcp_size)
    return (tp_rank * pcp_size + pcp_rank) % dcp_size


def dcp_heads_of(tp_rank: int, tp_size: int, dcp_size: int, num_kv_heads: int) -> range:
    """The global KV heads a TP rank holds when its TP group is cut into DCP groups of
    ``dcp_size`` consecutive ranks: every rank of a DCP group holds the same heads (it holds a
    token shard of them), those of DCP group ``tp_rank // D`` under TP ``tp_size // D``.

    This is SGLang's rule (sglang/srt/configs/model_config.py ``get_num_kv_heads(tp, dcp)``),
    and equals vLLM's plain TP heads (``heads_of(tp_rank, tp_size, H)``) wherever vLLM accepts
    DCP for GQA (vllm/config/model.py: tp > H, D <= tp / H) and D divides tp / H; MLA's one
    latent head is on every rank. A layout where a DCP group's ranks would hold different heads
    under plain TP (e.g. tp 12, H 2, D 4) is refused: no runner decodes it correctly.

    >>> [dcp_heads_of(t, 8, 2, 2) for t in (0, 3, 4, 7)]
    [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    >>> dcp_heads_of(3, 4, 2, 8)
    range(4, 8)
    """
    check_count(dcp_size, "dcp size", 1)
    check_count(num_kv_heads, "num_kv_heads", 1)
    if tp_size % dcp_size:
        raise ValueError(f"dcp size: expected a divisor of tp {tp_size}, got {dcp_size}")
    groups = tp_size // dcp_size
    if max(groups, num_kv_heads) % min(groups, num_kv_heads):
        raise ValueError(f"dcp size {dcp_size} at tp {tp_size}: expected a number of DCP groups "
                         f"that divides or is a multiple of num_kv_heads {num_kv_heads} (so that "
                         f"the ranks of a DCP group hold the same heads), got {groups}")
    return heads_of(tp_rank // dcp_size, groups, num_kv_heads)
