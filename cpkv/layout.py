"""Descriptions of a paged KV pool (`PagedKVCache`) and of the packed slot format (`PackedFormat`).

A pool holds, for each *component* (K and V for MHA/GQA, one latent for MLA, or any extra
per-layer buffer such as fp8 scales), one tensor per layer:

    NHD: [num_pages, page_size, num_heads, head_dim]
    HND: [num_pages, num_heads, page_size, head_dim]

Every component shares num_pages, page_size, num_heads, layout and device; head_dim and dtype
may differ per component. Layer tensors may be strided views (e.g. a head slice of a larger
buffer) as long as each head row (the head_dim axis) is contiguous.

Packed format (version 1), the byte layout of a staging slot for `num_tokens` tokens:

    for layer in the selected layer range:          # layer-major: layer l can ship alone
        for component in pool order:
            block [num_tokens, n_heads_selected, head_dim] in the component's dtype,
            dense, bytes unchanged

Blocks follow each other with no padding, so block b starts at byte
``num_tokens * sum(row_nbytes of blocks before b)`` and the slot size is linear in tokens:
``num_tokens * num_layers * sum(row_nbytes)``, where a component's row is its selected heads of
one token.

Token t of a request is page ``page_ids[t // page_size]``, slot ``t % page_size``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["FORMAT_VERSION", "ComponentSpec", "PackedFormat", "PagedKVCache"]

FORMAT_VERSION = 1
LAYOUTS = ("NHD", "HND")


@dataclass(frozen=True)
class ComponentSpec:
    """One per-layer buffer kind of a pool: its name, head count, row length and dtype."""

    name: str
    num_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def head_nbytes(self) -> int:
        """Bytes of one head row (one token, one head)."""
        return self.head_dim * self.itemsize


@dataclass(frozen=True)
class PackedFormat:
    """The geometry of one packed slot; equal formats are byte-compatible.

    ``components`` lists each component with ``num_heads`` already narrowed to the packed head
    slice, so a sender packing heads [2, 4) of 8 and a receiver unpacking at heads [0, 2) of 2
    agree on the format.
    """

    num_tokens: int
    num_layers: int
    components: tuple[ComponentSpec, ...]
    version: int = FORMAT_VERSION

    @property
    def row_nbytes(self) -> list[int]:
        """Bytes of one token's selected heads, per component."""
        return [c.num_heads * c.head_nbytes for c in self.components]

    def block_offsets(self) -> list[int]:
        """Byte offset of every block, in layer-major order (index ``layer * n_comp + comp``)."""
        rows = self.row_nbytes * self.num_layers
        return [self.num_tokens * sum(rows[:b]) for b in range(len(rows))]

    @property
    def nbytes(self) -> int:
        """Total packed size in bytes (0 for an empty request or no layers)."""
        return self.num_tokens * self.num_layers * sum(self.row_nbytes)

    def check_matches(self, expected: PackedFormat) -> None:
        """Raise ValueError naming the first field where this (received) format differs."""
        for field in ("version", "num_tokens", "num_layers"):
            if getattr(self, field) != getattr(expected, field):
                raise ValueError(
                    f"packed format: {field} expected {getattr(expected, field)}, "
                    f"got {getattr(self, field)}"
                )
        names = [c.name for c in self.components]
        if names != [c.name for c in expected.components]:
            raise ValueError(
                f"packed format: components expected {[c.name for c in expected.components]}, "
                f"got {names}"
            )
        for got, want in zip(self.components, expected.components, strict=True):
            for field in ("num_heads", "head_dim", "dtype"):
                if getattr(got, field) != getattr(want, field):
                    raise ValueError(
                        f"packed format: component {got.name!r} {field} expected "
                        f"{getattr(want, field)}, got {getattr(got, field)}"
                    )

    def to_dict(self) -> dict:
        """A JSON-able description (for control-plane messages)."""
        return {
            "version": self.version,
            "num_tokens": self.num_tokens,
            "num_layers": self.num_layers,
            "components": [
                [c.name, c.num_heads, c.head_dim, str(c.dtype).removeprefix("torch.")]
                for c in self.components
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> PackedFormat:
        comps = tuple(
            ComponentSpec(name, int(h), int(hd), _dtype_from_name(dt))
            for name, h, hd, dt in d["components"]
        )
        return cls(int(d["num_tokens"]), int(d["num_layers"]), comps, int(d["version"]))


class PagedKVCache:
    """A paged KV pool: for each component, one tensor per layer.

    Args:
        components: name -> list of per-layer tensors, or one stacked ``[layers, ...]`` tensor.
            Per-layer shape is ``[num_pages, page_size, num_heads, head_dim]`` (NHD) or
            ``[num_pages, num_heads, page_size, head_dim]`` (HND); a 3-D
            ``[num_pages, page_size, dim]`` tensor is taken as one head (MLA latent).
        layout: "NHD" (SGLang/vLLM token-major) or "HND".

    Example::

        k = torch.zeros(4, 64, 16, 8, 128, dtype=torch.bfloat16)  # [layers, pages, ps, heads, dim]
        cache = PagedKVCache.mha(k, torch.zeros_like(k))
        cache.packed_nbytes(100)  # 4 layers * 2 comps * 100 tokens * 8 heads * 256 B = 819200
    """

    def __init__(self, components: Mapping[str, Sequence[torch.Tensor] | torch.Tensor], *,
                 layout: str = "NHD"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if not components:
            raise ValueError("components: expected at least one component, got none")
        self.layout = layout
        self.buffers: dict[str, list[torch.Tensor]] = {}
        for name, layers in components.items():
            if not isinstance(name, str):
                raise TypeError(f"component names: expected str, got {type(name).__name__}")
            self.buffers[name] = _layer_list(name, layers, layout)
        self._validate()
        self._kernel_tables: dict = {}  # per-pool launch data cached by cpkv.kernels

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def mha(cls, k, v, *, layout: str = "NHD") -> PagedKVCache:
        """K and V per layer (MHA/GQA): lists of per-layer tensors or stacked tensors."""
        return cls({"k": k, "v": v}, layout=layout)

    @classmethod
    def mla(cls, latent, *, layout: str = "NHD") -> PagedKVCache:
        """One latent buffer per layer, ``[num_pages, page_size, dim]`` (e.g. dim 512 + 64)."""
        return cls({"latent": latent}, layout=layout)

    @classmethod
    def empty(cls, specs: Sequence[ComponentSpec], *, num_layers: int, num_pages: int,
              page_size: int, layout: str = "NHD", device="cpu") -> PagedKVCache:
        """Allocate a pool (uninitialised memory) for the given components."""
        for what, v in (("num_layers", num_layers), ("num_pages", num_pages),
                        ("page_size", page_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{what}: expected a positive int, got {v!r}")
        comps = {}
        for s in specs:
            if layout == "NHD":
                shape = (num_layers, num_pages, page_size, s.num_heads, s.head_dim)
            else:
                shape = (num_layers, num_pages, s.num_heads, page_size, s.head_dim)
            comps[s.name] = torch.empty(shape, dtype=s.dtype, device=device)
        return cls(comps, layout=layout)

    @classmethod
    def empty_mha(cls, *, num_layers: int, num_pages: int, page_size: int, num_heads: int,
                  head_dim: int, dtype: torch.dtype, layout: str = "NHD",
                  device="cpu") -> PagedKVCache:
        specs = [ComponentSpec(n, num_heads, head_dim, dtype) for n in ("k", "v")]
        return cls.empty(specs, num_layers=num_layers, num_pages=num_pages,
                         page_size=page_size, layout=layout, device=device)

    @classmethod
    def empty_mla(cls, *, num_layers: int, num_pages: int, page_size: int, dim: int = 576,
                  dtype: torch.dtype = torch.bfloat16, layout: str = "NHD",
                  device="cpu") -> PagedKVCache:
        specs = [ComponentSpec("latent", 1, dim, dtype)]
        return cls.empty(specs, num_layers=num_layers, num_pages=num_pages,
                         page_size=page_size, layout=layout, device=device)

    # -- geometry --------------------------------------------------------------------------

    @property
    def component_names(self) -> list[str]:
        return list(self.buffers)

    @property
    def components(self) -> tuple[ComponentSpec, ...]:
        return self._specs

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.buffers.values())))

    @property
    def num_pages(self) -> int:
        return self._first.shape[0]

    @property
    def page_size(self) -> int:
        return self._first.shape[1 if self.layout == "NHD" else 2]

    @property
    def num_heads(self) -> int:
        return self._specs[0].num_heads

    @property
    def device(self) -> torch.device:
        return self._first.device

    @property
    def num_token_slots(self) -> int:
        return self.num_pages * self.page_size

    def layer(self, component: str, layer: int) -> torch.Tensor:
        return self.buffers[component][layer]

    def nhd_view(self, component: str, layer: int) -> torch.Tensor:
        """The layer tensor as ``[num_pages, page_size, num_heads, head_dim]`` (a view)."""
        t = self.buffers[component][layer]
        return t if self.layout == "NHD" else t.transpose(1, 2)

    def bytes_per_token(self, *, heads=None) -> int:
        """Bytes one token occupies in one layer, over all components (optionally a head slice)."""
        h = as_range(heads, self.num_heads, "heads")
        return sum(len(h) * c.head_nbytes for c in self._specs)

    def packed_format(self, num_tokens: int, *, layers=None, heads=None) -> PackedFormat:
        """The packed format of ``num_tokens`` tokens over a layer range and head slice."""
        lr = as_range(layers, self.num_layers, "layers")
        hr = as_range(heads, self.num_heads, "heads")
        comps = tuple(ComponentSpec(c.name, len(hr), c.head_dim, c.dtype) for c in self._specs)
        return PackedFormat(int(num_tokens), len(lr), comps)

    def packed_nbytes(self, num_tokens: int, *, layers=None, heads=None) -> int:
        """Bytes of the packed slot for ``num_tokens`` tokens."""
        return self.packed_format(num_tokens, layers=layers, heads=heads).nbytes

    def __repr__(self) -> str:
        comps = ", ".join(f"{c.name}:{c.num_heads}x{c.head_dim}:{str(c.dtype)[6:]}"
                          for c in self._specs)
        return (f"PagedKVCache({self.layout}, layers={self.num_layers}, pages={self.num_pages}, "
                f"page_size={self.page_size}, [{comps}], device={self.device})")

    # -- validation ------------------------------------------------------------------------

    def _validate(self) -> None:
        first_name = next(iter(self.buffers))
        self._first = self.buffers[first_name][0]
        ref = self._first
        n_layers = len(self.buffers[first_name])
        specs = []
        for name, layers in self.buffers.items():
            if len(layers) != n_layers:
                raise ValueError(f"component {name!r}: expected {n_layers} layers (as "
                                 f"{first_name!r}), got {len(layers)}")
            c0 = layers[0]
            heads_dim = 2 if self.layout == "NHD" else 1
            spec = ComponentSpec(name, c0.shape[heads_dim], c0.shape[3], c0.dtype)
            for i, t in enumerate(layers):
                where = f"component {name!r} layer {i}"
                if t.device != ref.device:
                    raise ValueError(f"{where}: expected device {ref.device}, got {t.device}")
                if t.dtype != spec.dtype:
                    raise TypeError(f"{where}: expected dtype {spec.dtype} (as layer 0), "
                                    f"got {t.dtype}")
                if t.is_complex() or t.dtype == torch.bool:
                    raise TypeError(f"{where}: dtype {t.dtype} is not supported")
                if t.shape != c0.shape:
                    raise ValueError(f"{where}: expected shape {tuple(c0.shape)} (as layer 0), "
                                     f"got {tuple(t.shape)}")
                if t.shape[3] > 1 and t.stride(3) != 1:
                    raise ValueError(f"{where}: head_dim axis must be contiguous (stride 1), "
                                     f"got stride {t.stride(3)}")
            if c0.shape[0] != ref.shape[0]:
                raise ValueError(f"component {name!r}: expected num_pages {ref.shape[0]}, "
                                 f"got {c0.shape[0]}")
            ps_dim = 1 if self.layout == "NHD" else 2
            if c0.shape[ps_dim] != ref.shape[ps_dim]:
                raise ValueError(f"component {name!r}: expected page_size {ref.shape[ps_dim]}, "
                                 f"got {c0.shape[ps_dim]}")
            if spec.num_heads != (specs[0].num_heads if specs else spec.num_heads):
                raise ValueError(f"component {name!r}: expected num_heads {specs[0].num_heads} "
                                 f"(as {first_name!r}), got {spec.num_heads}")
            if min(c0.shape) < 1:
                raise ValueError(f"component {name!r}: every dimension must be >= 1, "
                                 f"got shape {tuple(c0.shape)}")
            specs.append(spec)
        self._specs = tuple(specs)


def as_range(value, size: int, what: str) -> range:
    """Normalise None / (start, stop) / range / slice into a step-1 range inside [0, size)."""
    if value is None:
        return range(size)
    if isinstance(value, slice):
        if value.step not in (None, 1):
            raise ValueError(f"{what}: expected step 1, got {value.step}")
        value = range(*value.indices(size))
    if isinstance(value, range):
        if value.step != 1:
            raise ValueError(f"{what}: expected step 1, got {value.step}")
        start, stop = value.start, value.stop
    elif isinstance(value, Sequence) and len(value) == 2:
        start, stop = value
    else:
        raise TypeError(f"{what}: expected None, (start, stop), range or slice, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)):
        raise TypeError(f"{what}: expected int bounds, got ({start!r}, {stop!r})")
    if not 0 <= start <= stop <= size:
        raise ValueError(f"{what}: expected a range inside [0, {size}), got [{start}, {stop})")
    return range(start, stop)


def _layer_list(name: str, layers, layout: str) -> list[torch.Tensor]:
    if isinstance(layers, torch.Tensor):
        if layers.dim() not in (4, 5):
            raise ValueError(f"component {name!r}: a stacked tensor must be [layers, ...] with "
                             f"4 or 5 dims, got shape {tuple(layers.shape)}")
        layers = list(layers.unbind(0))
    elif isinstance(layers, Sequence):
        layers = list(layers)
    else:
        raise TypeError(f"component {name!r}: expected a list of tensors or a stacked tensor, "
                        f"got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"component {name!r}: expected at least one layer, got none")
    out = []
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"component {name!r} layer {i}: expected a tensor, "
                            f"got {type(t).__name__}")
        if t.dim() == 3:  # [num_pages, page_size, dim]: one head (MLA latent)
            t = t.unsqueeze(2 if layout == "NHD" else 1)
        if t.dim() != 4:
            raise ValueError(f"component {name!r} layer {i}: expected 3 or 4 dims, "
                             f"got shape {tuple(t.shape)}")
        out.append(t)
    return out


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"packed format: unknown dtype {name!r}")
    return dt
