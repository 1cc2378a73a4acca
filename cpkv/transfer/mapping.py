"""Which prefill ranks send what to which decode rank when the two sides' parallel sizes differ.

Who holds which KV heads (TP) and layers (PP) is `cpkv.parallel`'s arithmetic (`heads_of`,
`layers_of`); MLA keeps one latent per token, replicated on every TP rank.

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

from ..parallel import ParallelRank, ParallelSizes, heads_of, is_first_holder, layers_of

__all__ = ["Route", "map_ranks"]


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
        """Every head and layer, unchanged: the route when both sides have equal sizes."""
        heads, layers = range(num_heads), range(num_layers)
        return cls(tp, pp, heads, heads, layers, layers)

    @property
    def key(self) -> str:
        return f"tp{self.tp}.pp{self.pp}"

    def senders(self, cp: int, dp: int = 0) -> list[ParallelRank]:
        return [ParallelRank(dp=dp, cp=c, tp=self.tp, pp=self.pp) for c in range(cp)]


def _intersect(a: range, b: range) -> range:
    return range(max(a.start, b.start), max(max(a.start, b.start), min(a.stop, b.stop)))


def _shift(r: range, by: int) -> range:
    return range(r.start - by, r.stop - by)


def map_ranks(prefill: ParallelSizes, decode: ParallelSizes, *, num_kv_heads: int,
              num_layers: int, kind: str = "mha") -> dict[tuple[int, int], list[Route]]:
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
                    if not is_first_holder(p_tp, prefill.tp, num_kv_heads):
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
