"""Storage keys for KV pages of a CP/TP/PP deployment in an external (hierarchical) cache.

A key names the *bytes* a rank holds for one page, so ranks holding equal bytes share a key and
ranks holding different bytes never do:

    {prefix}/{page_hash}[/pp{stage}][/tp{head_shard}][/cp{cp_rank}]

* ``pp{stage}``: only with pipeline parallelism (stages hold different layers).
* ``tp{head_shard}``: MHA/GQA with TP > 1, where ranks hold different KV heads. When TP exceeds
  the KV head count, ``tp_size / num_kv_heads`` consecutive ranks replicate one head and share
  its shard index. MLA never has it: the latent is replicated across TP.
* ``cp{rank}``: only when CP ranks hold different bytes (each keeps just its page share). After
  the CP all-gather every CP rank holds the whole sequence, so CP ranks share keys.

Among the ranks that share a key exactly one writes it (the lowest TP replica of its head shard,
CP rank 0 where CP is replicated); every rank may read it.
"""

from __future__ import annotations

from ..parallel import ParallelRank, ParallelSizes, head_shard, is_first_holder

__all__ = ["is_key_writer", "storage_key"]


def _head_shard(kind: str, num_kv_heads: int, rank: ParallelRank,
                sizes: ParallelSizes) -> int | None:
    """Which distinct KV-head shard this TP rank holds (None: one shard for all TP ranks)."""
    if kind not in ("mha", "mla"):
        raise ValueError(f"kind: expected 'mha' or 'mla', got {kind!r}")
    sizes.check(rank)
    if kind == "mla" or sizes.tp == 1:
        return None
    return head_shard(rank.tp, sizes.tp, num_kv_heads)


def storage_key(prefix: str, page_hash: str, rank: ParallelRank, sizes: ParallelSizes, *,
                kind: str = "mha", num_kv_heads: int = 1, cp_replicated: bool = True) -> str:
    """The key under which this rank's bytes of page ``page_hash`` are stored.

    >>> storage_key("l70", "abc", ParallelRank(tp=3, pp=1), ParallelSizes(tp=4, pp=2),
    ...             num_kv_heads=2)
    'l70/abc/pp1/tp1'
    """
    shard = _head_shard(kind, num_kv_heads, rank, sizes)
    parts = [prefix, page_hash]
    if sizes.pp > 1:
        parts.append(f"pp{rank.pp}")
    if shard is not None:
        parts.append(f"tp{shard}")
    if sizes.cp > 1 and not cp_replicated:
        parts.append(f"cp{rank.cp}")
    return "/".join(parts)


def is_key_writer(rank: ParallelRank, sizes: ParallelSizes, *, kind: str = "mha",
                  num_kv_heads: int = 1, cp_replicated: bool = True) -> bool:
    """Whether this rank is the one that writes its key (readers: every rank)."""
    shard = _head_shard(kind, num_kv_heads, rank, sizes)
    first_tp = rank.tp == 0 if shard is None else is_first_holder(rank.tp, sizes.tp,
                                                                   num_kv_heads)
    return first_tp and (rank.cp == 0 or not cp_replicated)
