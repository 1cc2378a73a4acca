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

from dataclasses import dataclass

__all__ = ["RankCoords", "storage_key", "is_key_writer"]


@dataclass(frozen=True)
class RankCoords:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            rank, size = getattr(self, f"{name}_rank"), getattr(self, f"{name}_size")
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{name}: expected 0 <= rank < size, got rank {rank}, "
                                 f"size {size}")


def _head_shard(kind: str, num_kv_heads: int, c: RankCoords) -> int | None:
    """Which distinct KV-head shard this TP rank holds (None: one shard for all TP ranks)."""
    if kind not in ("mha", "mla"):
        raise ValueError(f"kind: expected 'mha' or 'mla', got {kind!r}")
    if kind == "mla" or c.tp_size == 1:
        return None
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads: expected >= 1, got {num_kv_heads}")
    if c.tp_size <= num_kv_heads:
        if num_kv_heads % c.tp_size:
            raise ValueError(f"num_kv_heads {num_kv_heads} is not divisible by tp_size "
                             f"{c.tp_size}")
        return c.tp_rank
    if c.tp_size % num_kv_heads:
        raise ValueError(f"tp_size {c.tp_size} is not a multiple of num_kv_heads {num_kv_heads}")
    return c.tp_rank // (c.tp_size // num_kv_heads)


def storage_key(prefix: str, page_hash: str, coords: RankCoords, *, kind: str = "mha",
                num_kv_heads: int = 1, cp_replicated: bool = True) -> str:
    """The key under which this rank's bytes of page ``page_hash`` are stored."""
    parts = [prefix, page_hash]
    if coords.pp_size > 1:
        parts.append(f"pp{coords.pp_rank}")
    shard = _head_shard(kind, num_kv_heads, coords)
    if shard is not None:
        parts.append(f"tp{shard}")
    if coords.cp_size > 1 and not cp_replicated:
        parts.append(f"cp{coords.cp_rank}")
    return "/".join(parts)


def is_key_writer(coords: RankCoords, *, kind: str = "mha", num_kv_heads: int = 1,
                  cp_replicated: bool = True) -> bool:
    """Whether this rank is the one that writes its key (readers: every rank)."""
    shard = _head_shard(kind, num_kv_heads, coords)
    if shard is None:
        first_tp = coords.tp_rank == 0
    else:
        replicas = max(1, coords.tp_size // num_kv_heads)
        first_tp = coords.tp_rank % replicas == 0
    return first_tp and (coords.cp_rank == 0 or not cp_replicated)
