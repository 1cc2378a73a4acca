"""The transfer demo's data: seeded reference K/V per request, fragmented page ids per side,
the pools, and the check that a decode pool holds a request's bytes (naming the first wrong
byte by request, layer, component, token and byte, as `PackedFormat.locate` places it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..layout import PackedFormat
from ..shapes import SHAPES
from .common import fill_random

if TYPE_CHECKING:
    from .transfer import DemoConfig


def reference_kv(cfg: DemoConfig, request_id: int) -> dict[str, torch.Tensor]:
    """The request's whole K/V, [layers, tokens, heads, head_dim] per component (seeded)."""
    g = torch.Generator().manual_seed(1000 + request_id)
    out = {}
    for spec in SHAPES[cfg.shape].components:
        t = torch.empty(cfg.num_layers, cfg.tokens, spec.num_heads, spec.head_dim,
                        dtype=spec.dtype)
        fill_random(t, g)
        out[spec.name] = t
    return out


def page_ids(cfg: DemoConfig, side: str) -> list[torch.Tensor]:
    """Fragmented page ids per request: a seeded permutation of the pool (differs per side)."""
    n = -(-cfg.tokens // cfg.page_size)
    g = torch.Generator().manual_seed(1 if side == "prefill" else 2)
    perm = torch.randperm(2 * n * cfg.requests, generator=g)
    return [perm[r * n:(r + 1) * n] for r in range(cfg.requests)]


def packed_format(cfg: DemoConfig, num_tokens: int | None = None, *,
                  num_layers: int | None = None) -> PackedFormat:
    """The packed slot of ``num_tokens`` (default: a request's) over the demo's layers: every
    packed size the demo uses is asked of it."""
    return SHAPES[cfg.shape].packed_format(cfg.tokens if num_tokens is None else num_tokens,
                                           cfg.num_layers if num_layers is None else num_layers)


def pool_pages(cfg: DemoConfig) -> int:
    """Pages of each side's pool: room for every request twice over (fragmented ids)."""
    return 2 * -(-cfg.tokens // cfg.page_size) * cfg.requests


def new_pool(cfg: DemoConfig):
    """A zeroed pool of the demo's shape on its device."""
    cache = SHAPES[cfg.shape].cache(num_pages=pool_pages(cfg), page_size=cfg.page_size,
                                    num_layers=cfg.num_layers, device=cfg.device)
    for layers in cache.buffers.values():
        for t in layers:
            t.view(torch.uint8).fill_(0)
    return cache


def clear_pages(cache, ids) -> None:
    """Zero the pages ``ids`` (every mode must fill them itself)."""
    for layers in cache.buffers.values():
        for t in layers:
            t[ids.long().to(t.device)] = 0


def verify(cfg: DemoConfig, cache, ids, rid: int) -> str | None:
    """None if the pool holds request rid's reference K/V bit for bit, else where it differs."""
    from ..kernels import pack_pages

    fmt = packed_format(cfg)
    got = pack_pages(cache, ids, num_tokens=cfg.tokens).cpu()
    want = torch.empty(fmt.nbytes, dtype=torch.uint8)  # the reference, packed by the format
    for c, t in enumerate(reference_kv(cfg, rid).values()):
        fmt.component_view(want, c)[0].copy_(t.view(torch.uint8))
    if torch.equal(got, want):
        return None
    first = int((got != want).nonzero()[0])
    at = fmt.locate(first)
    return (f"request {rid}, layer {at.layer}, component {at.component!r}, token {at.token}, "
            f"byte {at.byte}: got {int(got[first])}, expected {int(want[first])}")
