"""Parallel coordinates (dp/cp/tp/pp) and the split arithmetic every other module uses.

Pure integers: no tensors, no process groups, no control plane. Two types:

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
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LAYER_GROUP_BYTES", "ParallelRank", "ParallelSizes", "balanced_split", "head_shard",
           "heads_of", "is_first_holder", "layer_groups", "layers_of"]

LAYER_GROUP_BYTES = 16 << 20  # layer groups of at least this size are moved in turn

AXES = ("dp", "cp", "tp", "pp")


def _check_axes(obj, lowest: int, what: str) -> None:
    for a in AXES:
        v = getattr(obj, a)
        if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
            raise ValueError(f"{a}: expected a {what} int, got {v!r}")


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
        _check_axes(self, 0, "non-negative")

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
        _check_axes(self, 1, "positive")

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
    r = range(layers) if isinstance(layers, int) else layers
    step = max(1, -(-min_nbytes // max(layer_nbytes, 1)))
    return [range(l0, min(l0 + step, r.stop)) for l0 in range(r.start, r.stop, step)]
