"""Descriptions of a paged KV pool (`PagedKVCache`) and of the packed slot format (`PackedFormat`).

A pool holds, for each *component* (K and V for MHA/GQA, one latent for MLA, or any extra
per-layer buffer such as fp8 scales), one tensor per layer:

    NHD: [num_pages, page_size, num_heads, head_dim]
    HND: [num_pages, num_heads, page_size, head_dim]

Every component shares num_pages, page_size, num_heads, layout and device; head_dim and dtype
may differ per component. Layer tensors may be strided views (e.g. a head slice of a larger
buffer) as long as each head row (the head_dim axis) is contiguous and no two rows of the pool
(across components and layers) share a byte. Geometry is never inferred from a tensor's rank:
stacked ``[layers, ...]`` tensors and head-less ``[num_pages, page_size, dim]`` latents are
accepted only where the caller declares them; runners' own layouts go through `cpkv.adapters`.

Packed format (version 1), the byte layout of a staging slot for `num_tokens` tokens:

    for layer in the selected layer range:          # layer-major: layer l can ship alone
        for component in pool order:
            block [num_tokens, n_heads_selected, head_dim] in the component's dtype,
            dense, bytes unchanged

Blocks follow each other with no padding, so block b starts at byte
``num_tokens * sum(row_nbytes of blocks before b)`` and the slot size is linear in tokens:
``num_tokens * num_layers * sum(row_nbytes)``, where a component's row is its selected heads of
one token.

Regions (``region_tokens=R``): the slot is a sequence of values of R tokens each; value v holds
tokens [vR, vR + R) laid out as an ordinary packed slot of R tokens (layer-major inside the
value), so each value can be stored or sent on its own (a store page). Segments: a slot filled
piece by piece (each CP sender of a transfer packs its own tokens [t0, t1) alone) holds, at byte
``t0 * token_nbytes``, the packed slot of those tokens; because the format is linear in tokens,
where a segment lies does not depend on the other pieces. `PackedFormat` is the one place that
computes these byte positions (`PackedFormat.region`, `segment`, `block`, `locate`).

Token t of a request is page ``page_ids[t // page_size]``, entry ``t % page_size`` (FlashInfer's
word for the position inside a page; a "slot" in cpkv is always a staging slot).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._checks import check_count, check_index, is_int
from ._overlap import check_no_overlap

__all__ = ["FORMAT_VERSION", "ComponentSpec", "Location", "PackedFormat", "PagedKVCache", "Span"]

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


class Span(NamedTuple):
    """``nbytes`` bytes at byte ``offset`` of a slot; ``slot[span.slice]`` views them."""

    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.nbytes)


class Location(NamedTuple):
    """Where a byte of a packed slot comes from: request-local token (counted from the slot's
    first token), format-local layer, component name and byte inside that token's row."""

    token: int
    layer: int
    component: str
    byte: int


@dataclass(frozen=True)
class PackedFormat:
    """The geometry of one packed slot; equal formats are byte-compatible. The one place that
    says where bytes lie in a slot (module docstring: blocks, regions, segments).

    ``components`` lists each component with ``num_heads`` already narrowed to the packed head
    slice, so a sender packing heads [2, 4) of 8 and a receiver unpacking at heads [0, 2) of 2
    agree on the format. ``region_tokens`` (None: one region of ``num_tokens``) cuts the slot
    into values of that many tokens, each an ordinary packed slot (a divisor of ``num_tokens``).

    Example::

        fmt = cache.packed_format(64, region_tokens=16)   # 4 values, page-major for a store
        slot[fmt.region(2).slice]                          # tokens [32, 48), all layers
        fmt.segment(0, 16, 1, 3)                           # layers 1, 2 of a 16-token segment
    """

    num_tokens: int
    num_layers: int
    components: tuple[ComponentSpec, ...]
    version: int = FORMAT_VERSION
    region_tokens: int | None = None

    @property
    def row_nbytes(self) -> list[int]:
        """Bytes of one token's selected heads, per component."""
        return [c.num_heads * c.head_nbytes for c in self.components]

    @property
    def layer_row_nbytes(self) -> int:
        """Bytes one token packs to in one layer (every component)."""
        return sum(self.row_nbytes)

    @property
    def token_nbytes(self) -> int:
        """Bytes one token packs to over every layer: the slot is ``num_tokens`` of these."""
        return self.num_layers * self.layer_row_nbytes

    @property
    def nbytes(self) -> int:
        """Total packed size in bytes (0 for an empty request or no layers)."""
        return self.num_tokens * self.num_layers * sum(self.row_nbytes)

    @property
    def rows_per_region(self) -> int:
        """Tokens per value (``num_tokens`` when the slot is not cut)."""
        return self.num_tokens if self.region_tokens is None else self.region_tokens

    @property
    def num_regions(self) -> int:
        """Values in the slot (0 for an empty one)."""
        return self.num_tokens // self.rows_per_region if self.num_tokens else 0

    @property
    def region_nbytes(self) -> int:
        """Bytes of one value."""
        return self.rows_per_region * self.token_nbytes

    @property
    def layer_nbytes(self) -> int:
        """Bytes of one layer of one value: from a block to the same component's block of the
        next layer."""
        return self.rows_per_region * self.layer_row_nbytes

    def region(self, index: int) -> Span:
        """Value ``index``: tokens [index * R, index * R + R), every layer."""
        check_index(index, "region", self.num_regions)
        return Span(index * self.region_nbytes, self.region_nbytes)

    def block_offsets(self) -> list[int]:
        """Byte offset of every block of the first value (the whole slot when it is not cut),
        in layer-major order (index ``layer * n_comp + comp``)."""
        rows = self.row_nbytes * self.num_layers
        return [self.rows_per_region * sum(rows[:b]) for b in range(len(rows))]

    def block(self, layer: int, component: int, region: int = 0) -> Span:
        """Block (format-local ``layer``, ``component`` index) of value ``region``:
        ``[rows_per_region, heads, head_dim]`` of that component, dense."""
        check_index(layer, "layer", self.num_layers)
        check_index(component, "component", len(self.components))
        check_index(region, "region", max(self.num_regions, 1))
        rows = self.row_nbytes
        pre = layer * self.layer_row_nbytes + sum(rows[:component])  # bytes of earlier rows
        return Span(region * self.region_nbytes + self.rows_per_region * pre,
                    self.rows_per_region * rows[component])

    def component_view(self, slot: torch.Tensor, component: int) -> torch.Tensor:
        """Component ``component`` of every value and layer of a slot of this format, as one
        strided view of ``slot``: ``[num_regions, num_layers, rows_per_region, num_heads,
        head_dim * itemsize / slot.element_size()]``, the blocks `block` names.

        ``slot`` is 1-D and dense, holds the slot from its element 0, and is viewed in its own
        elements (bytes for uint8, or wider words): their size must divide the component's head
        row and every offset. Writing through the view fills the slot (a CP rank's shard, a
        reference copy), reading it reads the blocks.

        Example::

            fmt = cache.packed_format(20)                   # K and V, 20 tokens, all layers
            k = fmt.component_view(slot, 0)[0]              # [layers, 20, heads, head bytes]
        """
        check_index(component, "component", len(self.components))
        if not isinstance(slot, torch.Tensor) or slot.dim() != 1 or (
                slot.numel() > 1 and slot.stride(0) != 1):
            raise ValueError(f"slot: expected a dense 1-D tensor, got "
                             f"{getattr(slot, 'shape', type(slot).__name__)}")
        word, spec = slot.element_size(), self.components[component]
        first = self.block(0, component).offset if self.num_regions and self.num_layers else 0
        bytes_ = (self.region_nbytes, self.layer_nbytes, self.row_nbytes[component],
                  spec.head_nbytes, first)
        if any(b % word for b in bytes_):
            raise ValueError(f"slot: elements of {word} bytes do not divide component "
                             f"{spec.name!r}'s rows and offsets {bytes_}")
        if slot.numel() * word < self.nbytes:
            raise ValueError(f"slot: expected at least {self.nbytes} bytes, got "
                             f"{slot.numel() * word}")
        return slot.as_strided(
            (self.num_regions, self.num_layers, self.rows_per_region, spec.num_heads,
             spec.head_nbytes // word), tuple(b // word for b in bytes_[:4]) + (1,),
            slot.storage_offset() + first // word)

    def segment(self, t0: int, t1: int, l0: int = 0, l1: int | None = None) -> Span:
        """Layers [l0, l1) (format-local; default all) of the segment of tokens [t0, t1): the
        bytes a pack of those tokens alone writes when the slot is filled segment by segment
        (a transfer slot: each CP sender packs its share), or, in a cut slot, the values
        [t0, t1) span (region-aligned; a layer range only inside one value).

        The segment starts at ``t0 * token_nbytes``; inside it, layer l starts at
        ``l * (t1 - t0) * layer_row_nbytes``.
        """
        l1 = self.num_layers if l1 is None else l1
        if not (is_int(t0) and is_int(t1) and 0 <= t0 <= t1 <= self.num_tokens):
            raise ValueError(f"segment: expected tokens 0 <= t0 <= t1 <= {self.num_tokens}, "
                             f"got [{t0}, {t1})")
        if not (is_int(l0) and is_int(l1) and 0 <= l0 <= l1 <= self.num_layers):
            raise ValueError(f"segment: expected layers 0 <= l0 <= l1 <= {self.num_layers}, "
                             f"got [{l0}, {l1})")
        if self.region_tokens is not None and t1 > t0:
            r = self.region_tokens
            if t0 % r or t1 % r:
                raise ValueError(f"segment: tokens [{t0}, {t1}) do not start and end on values "
                                 f"of {r} tokens")
            if t1 - t0 > r and (l0, l1) != (0, self.num_layers):
                raise ValueError(f"segment: layers [{l0}, {l1}) of several values are not "
                                 f"contiguous; ask one value at a time")
        n = t1 - t0
        return Span(t0 * self.token_nbytes + l0 * n * self.layer_row_nbytes,
                    (l1 - l0) * n * self.layer_row_nbytes)

    def locate(self, offset: int) -> Location:
        """The token, layer, component and row byte that byte ``offset`` of the slot holds."""
        check_index(offset, "offset", self.nbytes)
        region, offset = divmod(offset, self.region_nbytes)
        rows, r = self.row_nbytes, self.rows_per_region
        layer, offset = divmod(offset, r * self.layer_row_nbytes)
        comp = 0
        while offset >= r * rows[comp]:
            offset -= r * rows[comp]
            comp += 1
        token, byte = divmod(offset, rows[comp])
        return Location(region * r + token, layer, self.components[comp].name, byte)

    def check_matches(self, expected: PackedFormat) -> None:
        """Raise ValueError naming the first field where this (received) format differs."""
        for field in ("version", "num_tokens", "num_layers", "region_tokens"):
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
        """A JSON-able description (for control-plane messages); ``region_tokens`` only when
        the slot is cut."""
        d = {
            "version": self.version,
            "num_tokens": self.num_tokens,
            "num_layers": self.num_layers,
            "components": [
                [c.name, c.num_heads, c.head_dim, str(c.dtype).removeprefix("torch.")]
                for c in self.components
            ],
        }
        if self.region_tokens is not None:
            d["region_tokens"] = self.region_tokens
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> PackedFormat:
        """Parse `to_dict` output, refusing anything it could not have written."""
        if not isinstance(d, Mapping):
            raise TypeError(f"packed format: expected a mapping, got {type(d).__name__}")
        missing = {"version", "num_tokens", "num_layers", "components"} - set(d)
        if missing:
            raise ValueError(f"packed format: missing fields {sorted(missing)}")
        version = _field_int(d["version"], "version", 1)
        if version != FORMAT_VERSION:
            raise ValueError(f"packed format: version expected {FORMAT_VERSION}, got {version}")
        if not isinstance(d["components"], (list, tuple)) or not d["components"]:
            raise ValueError(f"packed format: components expected a non-empty list, "
                             f"got {d['components']!r}")
        comps = []
        for entry in d["components"]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 4:
                raise ValueError(f"packed format: a component expected [name, num_heads, "
                                 f"head_dim, dtype], got {entry!r}")
            name, h, hd, dt = entry
            if not isinstance(name, str) or not isinstance(dt, str):
                raise ValueError(f"packed format: component name and dtype expected strings, "
                                 f"got {name!r}, {dt!r}")
            comps.append(ComponentSpec(name, _field_int(h, f"{name}.num_heads", 1),
                                       _field_int(hd, f"{name}.head_dim", 1),
                                       _dtype_from_name(dt)))
        num_tokens = _field_int(d["num_tokens"], "num_tokens", 0)
        region = d.get("region_tokens")
        if region is not None:
            region = _field_int(region, "region_tokens", 1)
            if num_tokens % region:
                raise ValueError(f"packed format: num_tokens {num_tokens} expected a multiple "
                                 f"of region_tokens {region}")
        return cls(num_tokens, _field_int(d["num_layers"], "num_layers", 0), tuple(comps),
                   version, region)


MAX_FIELD = (1 << 31) - 1  # token, layer, head and row counts: kernels index them in 32 bits


def _field_int(value, what: str, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"packed format: {what} expected an int >= {minimum}, got {value!r}")
    if value > MAX_FIELD:
        raise ValueError(f"packed format: {what} expected an int <= {MAX_FIELD}, got "
                         f"{str(value)[:40]}")
    return value


class PagedKVCache:
    """A paged KV pool: for each component, one tensor per layer. Nothing is guessed.

    Args:
        components: name -> list of per-layer tensors, each
            ``[num_pages, page_size, num_heads, head_dim]`` (NHD) or
            ``[num_pages, num_heads, page_size, head_dim]`` (HND). With ``stacked=True`` each
            value is one tensor whose axis 0 is layers instead of a list.
        layout: "NHD" (SGLang/vLLM token-major) or "HND".
        stacked: the values are ``[layers, ...]`` tensors (only where the caller says so).
        latent: names of components given without a heads axis, ``[num_pages, page_size, dim]``
            per layer: one head (an MLA latent, an indexer cache).

    Any other shape is a ValueError naming what came and what was expected; a runner's own
    buffers (SGLang token-major ``[slots, heads, dim]``, vLLM's and FlashInfer's fused K/V
    tensors) go through `cpkv.adapters`, which builds the views without a copy.

    Example::

        k = torch.zeros(4, 64, 16, 8, 128, dtype=torch.bfloat16)  # [layers, pages, ps, heads, dim]
        cache = PagedKVCache.mha(k, torch.zeros_like(k), stacked=True)
        cache.packed_nbytes(100)  # 4 layers * 2 comps * 100 tokens * 8 heads * 256 B = 819200
    """

    def __init__(self, components: Mapping[str, Sequence[torch.Tensor] | torch.Tensor], *,
                 layout: str = "NHD", stacked: bool = False, latent: Collection[str] = ()):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if not isinstance(components, Mapping) or not components:
            raise ValueError("components: expected at least one component, got none")
        if not isinstance(stacked, bool):
            raise TypeError(f"stacked: expected a bool, got {type(stacked).__name__}")
        if isinstance(latent, str) or not all(isinstance(n, str) for n in latent):
            raise TypeError(f"latent: expected a collection of component names, got {latent!r}")
        unknown = set(latent) - set(components)
        if unknown:
            raise ValueError(f"latent: expected names among {list(components)}, "
                             f"got {sorted(unknown)}")
        self.layout = layout
        self.buffers: dict[str, list[torch.Tensor]] = {}
        for name, layers in components.items():
            if not isinstance(name, str):
                raise TypeError(f"component names: expected str, got {type(name).__name__}")
            self.buffers[name] = _layer_list(name, layers, layout, stacked, name in latent)
        self._validate()

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def mha(cls, k, v, *, layout: str = "NHD", stacked: bool = False) -> PagedKVCache:
        """K and V (MHA/GQA): lists of per-layer ``[num_pages, page_size, heads, head_dim]``
        (NHD) tensors, or ``[layers, ...]`` tensors with ``stacked=True``."""
        return cls({"k": k, "v": v}, layout=layout, stacked=stacked)

    @classmethod
    def mla(cls, latent, *, layout: str = "NHD", stacked: bool = False) -> PagedKVCache:
        """One latent per layer, ``[num_pages, page_size, dim]`` (e.g. dim 512 + 64), as a list,
        or one ``[layers, num_pages, page_size, dim]`` tensor with ``stacked=True``."""
        return cls({"latent": latent}, layout=layout, stacked=stacked, latent=("latent",))

    @classmethod
    def empty(cls, specs: Sequence[ComponentSpec], *, num_layers: int, num_pages: int,
              page_size: int, layout: str = "NHD", device="cpu") -> PagedKVCache:
        """Allocate a pool (uninitialised memory) for the given components."""
        for what, v in (("num_layers", num_layers), ("num_pages", num_pages),
                        ("page_size", page_size)):
            check_count(v, what, 1)
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        comps = {}
        for s in specs:
            if not isinstance(s, ComponentSpec):
                raise TypeError(f"specs: expected ComponentSpec, got {type(s).__name__}")
            check_count(s.num_heads, f"component {s.name!r} num_heads", 1)
            check_count(s.head_dim, f"component {s.name!r} head_dim", 1)
            if not isinstance(s.dtype, torch.dtype):
                raise TypeError(f"component {s.name!r} dtype: expected a torch.dtype, "
                                f"got {s.dtype!r}")
            if layout == "NHD":
                shape = (num_layers, num_pages, page_size, s.num_heads, s.head_dim)
            else:
                shape = (num_layers, num_pages, s.num_heads, page_size, s.head_dim)
            comps[s.name] = torch.empty(shape, dtype=s.dtype, device=device)
        return cls(comps, layout=layout, stacked=True)

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
    def num_entries(self) -> int:
        """Token positions of the pool: ``num_pages * page_size``."""
        return self.num_pages * self.page_size

    num_token_slots = num_entries  # the former name ("slot" now means a staging slot only)

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

    def packed_format(self, num_tokens: int, *, layers=None, heads=None,
                      region_tokens: int | None = None) -> PackedFormat:
        """The packed format of ``num_tokens`` tokens over a layer range and head slice, cut
        into values of ``region_tokens`` tokens when given (a divisor of ``num_tokens``)."""
        lr = as_range(layers, self.num_layers, "layers")
        hr = as_range(heads, self.num_heads, "heads")
        check_region_tokens(region_tokens, num_tokens)
        comps = tuple(ComponentSpec(c.name, len(hr), c.head_dim, c.dtype) for c in self._specs)
        return PackedFormat(int(num_tokens), len(lr), comps, region_tokens=region_tokens)

    def packed_nbytes(self, num_tokens: int, *, layers=None, heads=None) -> int:
        """Bytes of the packed slot for ``num_tokens`` tokens (cut or not: the same)."""
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
        if ref.device.type != "meta":
            check_no_overlap(self.buffers, self.layout)


def check_region_tokens(region_tokens, num_tokens: int) -> None:
    """``region_tokens``: None, or a positive int dividing ``num_tokens``."""
    if region_tokens is None:
        return
    check_count(region_tokens, "region_tokens", 1)
    if num_tokens % region_tokens:
        raise ValueError(f"region_tokens: num_tokens {num_tokens} expected a multiple of "
                         f"region_tokens {region_tokens}")


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
    if not all(is_int(v) for v in (start, stop)):
        raise TypeError(f"{what}: expected int bounds, got ({start!r}, {stop!r})")
    if not 0 <= start <= stop <= size:
        raise ValueError(f"{what}: expected a range inside [0, {size}), got [{start}, {stop})")
    return range(start, stop)


def _expected(layout: str, latent: bool) -> str:
    if latent:
        return "[num_pages, page_size, dim]"
    return ("[num_pages, page_size, num_heads, head_dim]" if layout == "NHD"
            else "[num_pages, num_heads, page_size, head_dim]")


def _hint(dims: int, latent: bool) -> str:
    """Where a tensor of this rank most likely came from, and the adapter that takes it."""
    if dims == 3 and not latent:
        return ("; a token-major [slots, heads, head_dim] buffer (SGLang's k_buffer[layer]) "
                "goes through cpkv.adapters.from_sglang_mha(..., page_size=), and a one-head "
                "[num_pages, page_size, dim] latent through PagedKVCache.mla / latent=(name,)")
    if dims == 5 and not latent:
        return ("; a 5-D layer tensor holding K and V together (vLLM [2, blocks, ...], "
                "FlashInfer [pages, 2, ...]) goes through cpkv.adapters.from_vllm / "
                "from_flashinfer")
    if dims == 4 and latent:
        return "; an MHA component needs its heads axis declared: drop it from latent="
    return ""


def _layer_list(name: str, layers, layout: str, stacked: bool,
                latent: bool) -> list[torch.Tensor]:
    want_dims = 3 if latent else 4
    if stacked:
        if not isinstance(layers, torch.Tensor):
            raise TypeError(f"component {name!r}: stacked=True expects one [layers, ...] tensor, "
                            f"got {type(layers).__name__}")
        if layers.dim() != want_dims + 1:
            raise ValueError(f"component {name!r}: stacked=True expects [layers] + "
                             f"{_expected(layout, latent)} ({want_dims + 1} dims), got shape "
                             f"{tuple(layers.shape)}{_hint(layers.dim() - 1, latent)}")
        layers = list(layers.unbind(0))
    elif isinstance(layers, torch.Tensor):
        raise ValueError(f"component {name!r}: expected a list of per-layer tensors "
                         f"{_expected(layout, latent)}, got one tensor of shape "
                         f"{tuple(layers.shape)}; pass stacked=True if its axis 0 is layers"
                         f"{_hint(layers.dim(), latent)}")
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
        if t.dim() != want_dims:
            raise ValueError(f"component {name!r} layer {i}: expected "
                             f"{_expected(layout, latent)} ({want_dims} dims), got shape "
                             f"{tuple(t.shape)}{_hint(t.dim(), latent)}")
        if latent:  # one head, declared by the caller
            t = t.unsqueeze(2 if layout == "NHD" else 1)
        out.append(t)
    return out


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"packed format: unknown dtype {name!r}")
    return dt
