"""Which prefill ranks send what to which decode rank, across different parallel layouts.

KV heads under tensor parallelism: with ``tp <= H`` (H total KV heads, a multiple of tp) rank t
holds heads ``[t*H/tp, (t+1)*H/tp)``; with ``tp > H`` (a multiple of H) each rank holds one head,
``t * H // tp``, so ``tp / H`` consecutive ranks replicate it. MLA keeps one latent per token,
replicated on every TP rank. Layers under pipeline parallelism: balanced contiguous stages
(the first ``L % pp`` stages one layer longer).

For a decode rank, a *route* is one prefill (tp, pp) source: the heads and layers it holds that
the decode rank needs, as local ranges on both sides. Every CP rank of that source sends its page
share of the route, so the decode rank expects ``len(routes) * prefill.cp`` senders.

* Prefill TP > decode TP: several routes fill disjoint head ranges of one receiver.
* Prefill TP < decode TP: one prefill rank serves several receivers, each its own head slice.
* Replicated prefill heads are sent once (by the first replica); replicated decode heads are
  received by every replica.
* MLA: one route per receiver (prefill tp ``d % prefill.tp``); other TP ranks send nothing.
* Prefill PP > decode PP: each stage sends its layers into the receiver's layer range.
"""

from __future__ import annotations

from dataclasses import dataclass

from .control import ParallelRank

__all__ = ["Layout", "Route", "heads_of", "layers_of", "map_ranks"]


@dataclass(frozen=True)
class Layout:
    """One side's parallel sizes."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")


@dataclass(frozen=True)
class Route:
    """What prefill rank (tp, pp) sends to one decode rank, in local indices on both sides."""

    tp: int
    pp: int
    src_heads: range
    dst_heads: range
    src_layers: range
    dst_layers: range

    @classmethod
    def whole(cls, num_heads: int, num_layers: int, tp: int = 0, pp: int = 0) -> Route:
        """Every head and layer, unchanged: the route when both sides have the same layout."""
        heads, layers = range(num_heads), range(num_layers)
        return cls(tp, pp, heads, heads, layers, layers)

    @property
    def key(self) -> str:
        return f"tp{self.tp}.pp{self.pp}"

    def senders(self, cp: int, dp: int = 0) -> list[ParallelRank]:
        return [ParallelRank(dp=dp, cp=c, tp=self.tp, pp=self.pp) for c in range(cp)]


def heads_of(tp_rank: int, tp_size: int, num_kv_heads: int) -> range:
    """Global KV heads a TP rank holds (see module doc)."""
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise ValueError(f"num_kv_heads {num_kv_heads} is not divisible by tp {tp_size}")
        per = num_kv_heads // tp_size
        return range(tp_rank * per, (tp_rank + 1) * per)
    if tp_size % num_kv_heads:
        raise ValueError(f"tp {tp_size} is not a multiple of num_kv_heads {num_kv_heads}")
    head = tp_rank * num_kv_heads // tp_size
    return range(head, head + 1)


def layers_of(pp_rank: int, pp_size: int, num_layers: int) -> range:
    """Global layers a PP stage holds (balanced contiguous)."""
    if num_layers < pp_size:
        raise ValueError(f"num_layers {num_layers} is fewer than pp {pp_size} stages")
    base, rem = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, rem)
    return range(start, start + base + (pp_rank < rem))


def _intersect(a: range, b: range) -> range:
    return range(max(a.start, b.start), max(max(a.start, b.start), min(a.stop, b.stop)))


def _shift(r: range, by: int) -> range:
    return range(r.start - by, r.stop - by)


def map_ranks(prefill: Layout, decode: Layout, *, num_kv_heads: int, num_layers: int,
              kind: str = "mha") -> dict[tuple[int, int], list[Route]]:
    """For every decode rank (tp, pp), the routes that fill it (see module doc).

    Example: prefill tp 2 -> decode tp 1, 8 KV heads: decode (0, 0) gets heads [0, 4) from
    prefill tp 0 and [4, 8) from tp 1, each sent by every prefill CP rank for its page share.
    """
    if kind not in ("mha", "mla"):
        raise ValueError(f"kind: expected 'mha' or 'mla', got {kind!r}")
    if kind == "mla":
        num_kv_heads = 1
    out = {}
    for d_tp in range(decode.tp):
        d_heads = range(1) if kind == "mla" else heads_of(d_tp, decode.tp, num_kv_heads)
        for d_pp in range(decode.pp):
            d_layers = layers_of(d_pp, decode.pp, num_layers)
            routes = []
            for p_tp in range(prefill.tp):
                if kind == "mla":
                    if p_tp != d_tp % prefill.tp:
                        continue
                    p_heads = range(1)
                else:
                    p_heads = heads_of(p_tp, prefill.tp, num_kv_heads)
                    if p_tp != min(t for t in range(prefill.tp)
                                   if heads_of(t, prefill.tp, num_kv_heads) == p_heads):
                        continue  # a replica: the first holder sends
                heads = _intersect(p_heads, d_heads)
                if not heads:
                    continue
                for p_pp in range(prefill.pp):
                    p_layers = layers_of(p_pp, prefill.pp, num_layers)
                    layers = _intersect(p_layers, d_layers)
                    if layers:
                        routes.append(Route(p_tp, p_pp, _shift(heads, p_heads.start),
                                            _shift(heads, d_heads.start),
                                            _shift(layers, p_layers.start),
                                            _shift(layers, d_layers.start)))
            out[(d_tp, d_pp)] = routes
    return out
