"""The model shapes cpkv is measured on (../shared/BENCHMARKS.md), per rank and request."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import ComponentSpec, PackedFormat, PagedKVCache

__all__ = ["SHAPES", "ModelShape"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    model: str
    components: tuple[ComponentSpec, ...]
    num_layers: int

    def packed_format(self, num_tokens: int, num_layers: int | None = None) -> PackedFormat:
        """The packed slot of ``num_tokens`` tokens over every head and (default) every layer."""
        return PackedFormat(num_tokens, self.num_layers if num_layers is None else num_layers,
                            self.components)

    def cache(self, *, num_pages: int, page_size: int, num_layers: int | None = None,
              layout: str = "NHD", device="cpu") -> PagedKVCache:
        """An uninitialised pool of this shape (optionally with fewer layers)."""
        return PagedKVCache.empty(self.components, num_layers=num_layers or self.num_layers,
                                  num_pages=num_pages, page_size=page_size, layout=layout,
                                  device=device)


_BF16 = torch.bfloat16
SHAPES = {
    "A": ModelShape("A", "Llama-3.1-8B TP1", (ComponentSpec("k", 8, 128, _BF16),
                                              ComponentSpec("v", 8, 128, _BF16)), 32),
    "B": ModelShape("B", "Llama-3-70B TP8", (ComponentSpec("k", 1, 128, _BF16),
                                             ComponentSpec("v", 1, 128, _BF16)), 80),
    "C": ModelShape("C", "DeepSeek-V3 MLA", (ComponentSpec("latent", 1, 576, _BF16),), 61),
}
