"""Zero-copy views of the KV pools model runners allocate, as `PagedKVCache`.

Plain tensors and lists in, views out: nothing is copied, and nothing of SGLang, vLLM or
FlashInfer is imported. Every adapter states the runner's shape it expects and refuses anything
else with a ValueError naming the shape it got; layouts that no strided view can express (a
token's row not contiguous, or not at a fixed stride) are refused with the reason.

A runner's page (block) index is cpkv's page id: token ``loc`` of SGLang's token-major buffers
(SGLang's token slot) is page ``loc // page_size``, entry ``loc % page_size``; vLLM's block ``b``
is page ``b``.

    from cpkv.adapters import from_sglang_mha, from_vllm
    cache = from_sglang_mha(pool.k_buffer, pool.v_buffer, page_size=pool.page_size)
    cache = from_vllm(kv_caches, backend="flash_attn")   # list or dict of per-layer tensors
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._checks import check_count, is_int
from .layout import PagedKVCache

__all__ = ["from_flashinfer", "from_sglang_mha", "from_sglang_mla", "from_vllm"]

UNVIEWABLE = {
    # name -> why no strided view can address it
    "rocm_aiter": "vLLM's ROCm paged-attention / AITER layout stores K as 5-D "
                  "[num_blocks, heads, head_size // x, block_size, x]: one token's head row is "
                  "cut into x-element vectors spread block_size apart, so it is not a contiguous "
                  "row at a fixed stride",
    "interleaved": "SGLang's MXFP8 KV scales (page size 128) are interleaved across the tokens "
                   "of a page in the tile order of the attention kernel, so one token's scales "
                   "are not one row at a fixed (page, entry, head) stride",
}


def _layers(buffers, what: str) -> list[torch.Tensor]:
    """A list (or a dict's values, in insertion order) of per-layer tensors."""
    if isinstance(buffers, Mapping):
        buffers = list(buffers.values())
    if isinstance(buffers, torch.Tensor) or not isinstance(buffers, Sequence):
        raise TypeError(f"{what}: expected a list (or dict) of per-layer tensors, "
                        f"got {type(buffers).__name__}")
    if not buffers:
        raise ValueError(f"{what}: expected at least one layer, got none")
    for i, t in enumerate(buffers):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}]: expected a tensor, got {type(t).__name__}")
    return list(buffers)


def _check_dims(t: torch.Tensor, dims: int, what: str, expected: str) -> None:
    if t.dim() != dims:
        raise ValueError(f"{what}: expected {expected} ({dims} dims), got shape "
                         f"{tuple(t.shape)}")


def _check_page_size(page_size) -> None:
    check_count(page_size, "page_size", 1)


def _check_layout(layout) -> None:
    if layout not in ("NHD", "HND"):
        raise ValueError(f"layout: expected 'NHD' or 'HND', got {layout!r}")


def _token_major_pages(t: torch.Tensor, page_size: int, layout: str, what: str) -> torch.Tensor:
    """One SGLang layer buffer as pages (a view).

    NHD: the token-major ``[size + page_size, heads, dim]`` buffer as
    ``[num_pages, page_size, heads, dim]`` (token loc at page loc // ps, entry loc % ps).
    HND (``use_hnd``): SGLang allocates ``[num_pages, heads, page_size, dim]`` itself."""
    if layout == "HND":
        _check_dims(t, 4, what, "[num_pages, head_num, page_size, head_dim] (SGLang use_hnd)")
        if t.shape[2] != page_size:
            raise ValueError(f"{what}: expected page_size {page_size} on axis 2 of "
                             f"[num_pages, head_num, page_size, head_dim], got shape "
                             f"{tuple(t.shape)}")
        return t
    _check_dims(t, 3, what, "[size + page_size, heads, head_dim] (token-major)")
    rows = t.shape[0]
    if rows % page_size:
        raise ValueError(f"{what}: expected a row count that is a multiple of page_size "
                         f"{page_size} (size + page_size), got {rows} rows")
    return t.unflatten(0, (rows // page_size, page_size))


def from_sglang_mha(k_buffer, v_buffer, *, page_size: int, layout: str = "NHD",
                    extras: Mapping[str, Sequence[torch.Tensor]] | None = None,
                    scales_layout: str = "linear") -> PagedKVCache:
    """SGLang's MHA/GQA pool (``MHATokenToKVPool`` in
    ``python/sglang/srt/mem_cache/memory_pool.py``, shapes from its ``_kv_buffer_shapes``).

    Args:
        k_buffer, v_buffer: the pool's per-layer lists. NHD (default): each
            ``[size + page_size, head_num, head_dim]``, token-major (slot 0's page is SGLang's
            padding page); HND (``use_hnd``): each ``[num_pages, head_num, page_size,
            head_dim]``. ``v_head_dim`` may differ from K's; K and V may be halves of one fused
            buffer (views that share no bytes).
        page_size: the pool's page size; token ``loc`` is page ``loc // page_size``, entry
            ``loc % page_size``.
        layout: "NHD" or "HND", as the pool was allocated.
        extras: more per-layer buffers addressed like K (same layout and head count), e.g.
            per-head fp8 scales ``[size + page_size, head_num, 1]`` float32.
        scales_layout: "linear" (``extras`` rows are tokens) or "interleaved" (SGLang's MXFP8
            scales at page size 128), which no strided view expresses: ValueError.

    Example::

        cache = from_sglang_mha(pool.k_buffer, pool.v_buffer, page_size=pool.page_size)
    """
    _check_page_size(page_size)
    _check_layout(layout)
    if scales_layout != "linear":
        if scales_layout in UNVIEWABLE:
            raise ValueError(f"scales_layout {scales_layout!r}: {UNVIEWABLE[scales_layout]}; "
                             f"cpkv moves rows and cannot address them without a copy")
        raise ValueError(f"scales_layout: expected 'linear' or 'interleaved', "
                         f"got {scales_layout!r}")
    comps = {"k": _layers(k_buffer, "k_buffer"), "v": _layers(v_buffer, "v_buffer")}
    for name, bufs in (extras or {}).items():
        if name in comps:
            raise ValueError(f"extras: component name {name!r} is taken by K/V")
        comps[name] = _layers(bufs, f"extras[{name!r}]")
    views = {name: [_token_major_pages(t, page_size, layout, f"{name}[{i}]")
                    for i, t in enumerate(bufs)] for name, bufs in comps.items()}
    return PagedKVCache(views, layout=layout)


def from_sglang_mla(kv_buffer, *, page_size: int, index_k_with_scale=None,
                    index_head_dim: int = 128) -> PagedKVCache:
    """SGLang's MLA pool (``MLATokenToKVPool`` in ``python/sglang/srt/mem_cache/memory_pool.py``).

    Args:
        kv_buffer: per-layer ``[size + page_size, 1, kv_lora_rank + qk_rope_head_dim]`` (e.g.
            512 + 64 = 576) latent buffers, token-major; component ``"latent"``.
        page_size: the pool's page size.
        index_k_with_scale: optional per-layer NSA indexer buffers (DeepSeek V3.2,
            ``NSATokenToKVPool.index_k_with_scale_buffer``), uint8
            ``[num_pages, page_size * (index_head_dim + index_head_dim // 128 * 4)]``: in each
            page, ``page_size`` rows of ``index_head_dim`` fp8 values, then ``page_size`` rows of
            fp32 scales (one per 128 values). Become components ``"index_k"`` and
            ``"index_k_scale"`` (uint8 rows); pages past the latent's page count are not used.
        index_head_dim: the indexer's head dim (a multiple of 128).

    Example::

        cache = from_sglang_mla(pool.kv_buffer, page_size=pool.page_size)
    """
    _check_page_size(page_size)
    layers = _layers(kv_buffer, "kv_buffer")
    latent = []
    for i, t in enumerate(layers):
        _check_dims(t, 3, f"kv_buffer[{i}]", "[size + page_size, 1, kv_lora_rank + rope_dim]")
        if t.shape[1] != 1:
            raise ValueError(f"kv_buffer[{i}]: expected one latent head "
                             f"[size + page_size, 1, dim], got shape {tuple(t.shape)}")
        latent.append(_token_major_pages(t, page_size, "NHD", f"kv_buffer[{i}]")[:, :, 0])
    comps = {"latent": latent}
    if index_k_with_scale is not None:
        comps.update(_indexer_components(index_k_with_scale, page_size, index_head_dim,
                                         latent[0].shape[0], "index_k_with_scale"))
    return PagedKVCache(comps, latent=tuple(comps))


def _indexer_components(buffers, page_size: int, head_dim, num_pages: int,
                        what: str) -> dict[str, list[torch.Tensor]]:
    """An indexer K cache whose page holds ``page_size`` rows of ``head_dim`` fp8 values, then
    ``page_size`` rows of fp32 scales (one per 128 values), as components "index_k" and
    "index_k_scale" (uint8 rows; pages past ``num_pages`` unused). Takes a page as
    ``[pages, page_size * row]`` (SGLang) or ``[pages, page_size, row]`` (vLLM's shape of the
    same bytes)."""
    if not is_int(head_dim) or head_dim < 128 or head_dim % 128:
        raise ValueError(f"index_head_dim: expected a positive multiple of 128, "
                         f"got {head_dim!r}")
    n_scale = head_dim // 128 * 4
    page_bytes = page_size * (head_dim + n_scale)
    values, scales = [], []
    for i, t in enumerate(_layers(buffers, what)):
        where = f"{what}[{i}]"
        if t.dtype != torch.uint8 or t.dim() not in (2, 3) or t.shape[0] < num_pages or \
                t[0].numel() != page_bytes or (t.dim() == 3 and t.shape[1] != page_size):
            raise ValueError(f"{where}: expected uint8 [>= {num_pages} pages, {page_bytes}] "
                             f"or [>= {num_pages}, {page_size}, {head_dim + n_scale}] "
                             f"(page_size x (index_head_dim + scales)), got {t.dtype} "
                             f"{tuple(t.shape)}")
        if not t[0].is_contiguous():
            raise ValueError(f"{where}: expected each page's bytes contiguous, got strides "
                             f"{t.stride()}")
        page = t[:num_pages].flatten(1) if t.dim() == 3 else t[:num_pages]
        values.append(page[:, :page_size * head_dim].unflatten(1, (page_size, head_dim)))
        scales.append(page[:, page_size * head_dim:].unflatten(1, (page_size, n_scale)))
    return {"index_k": values, "index_k_scale": scales}


# What vLLM hands ``register_kv_caches`` per layer, by attention backend and release (the
# shapes of each release's ``get_kv_cache_shape`` / ``get_kv_cache_stride_order`` in
# ``vllm/v1/attention/backends/<backend>.py``; from 0.29 on, of ``create_kv_cache_views`` in
# ``vllm/v1/kv_cache_interface.py``, which gives every layer a logical [B, H, N, C] view whose
# stride order is the model's ``KVCacheLayout`` (``vllm/v1/kv_cache_layout.py``)).
# (first release, last release, layout)
VLLM_LAYOUTS = {
    "flash_attn": (((0, 11), (0, 22), "kv_first"), ((0, 23), (0, 25), "block_kv"),
                   ((0, 26), (0, 33), "fused")),
    "flashinfer": (((0, 11), (0, 25), "block_kv"), ((0, 26), (0, 33), "fused")),
    "triton_attn": (((0, 11), (0, 25), "block_kv"), ((0, 26), (0, 33), "fused")),
    "cpu": (((0, 11), (0, 11), "cpu_paged"), ((0, 12), (0, 22), "cpu_kv_first"),
            ((0, 23), (0, 33), "cpu_fused")),
    "mla": (((0, 11), (0, 28), "latent"), ((0, 29), (0, 33), "latent_head")),
}
VLLM_BACKENDS = tuple(VLLM_LAYOUTS)
# layout -> (shape, test of a tensor's shape)
_LAYOUT_SHAPES = {
    "kv_first": ("[2, num_blocks, block_size, kv_heads, head_size]",
                 lambda s: len(s) == 5 and s[0] == 2),
    "block_kv": ("[num_blocks, 2, block_size, kv_heads, head_size]",
                 lambda s: len(s) == 5 and s[1] == 2),
    "fused": ("[num_blocks, kv_heads, block_size, head_size + head_size_v] (K | V per head)",
              lambda s: len(s) == 4),
    "cpu_kv_first": ("[2, num_blocks, kv_heads, block_size, head_size]",
                     lambda s: len(s) == 5 and s[0] == 2),
    "cpu_fused": ("[num_blocks, kv_heads, block_size, 2 * head_size]", lambda s: len(s) == 4),
    "cpu_paged": ("[2, num_blocks, block_size * kv_heads * head_size]",
                  lambda s: len(s) == 3 and s[0] == 2),
    "latent": ("[num_blocks, block_size, head_size]", lambda s: len(s) == 3),
    "latent_head": ("[num_blocks, 1, block_size, head_size]",
                    lambda s: len(s) == 4 and s[1] == 1),
}
_CPU_PAGED = ("vLLM 0.11's CPU backend (TorchSDPA) keeps [2, num_blocks, block_size * kv_heads * "
              "head_size]: its paged-attention kernels read K as [blocks, heads, head_size // x, "
              "block_size, x] (x = 16 bytes) and V as [blocks, heads, head_size, block_size], so a "
              "token's head row is not contiguous (the IPEX path reads [blocks, heads, "
              "block_size, head_size], but the tensor does not say which path wrote it)")


def _version(v) -> tuple[int, int]:
    """A vLLM release as (major, minor), from "0.32.0", "0.11.2.post2", (0, 32), ..."""
    if isinstance(v, str):
        parts = v.split(".")
        try:
            return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
        except (ValueError, IndexError):
            pass
    elif isinstance(v, tuple) and len(v) >= 2 and all(is_int(x) for x in v[:2]):
        return v[0], v[1]
    raise ValueError(f"vllm_version: expected a release such as '0.32.0', got {v!r}")


def _vllm_layout(t: torch.Tensor, backend: str, version, what: str) -> str:
    """The layout of one layer tensor: the release's when ``version`` is given (its shape is
    checked against it), else the one its shape can only be."""
    table = VLLM_LAYOUTS[backend]
    shape = tuple(t.shape)
    if version is not None:
        ver = _version(version)
        kind = next((k for lo, hi, k in table if lo <= ver <= hi), None)
        if kind is None:
            raise ValueError(f"vllm_version: layouts of backend {backend!r} are known for vLLM "
                             f"0.11 through 0.33, got {version!r}")
        if not _LAYOUT_SHAPES[kind][1](shape):
            raise ValueError(f"{what}: vLLM {version} {backend} hands "
                             f"{_LAYOUT_SHAPES[kind][0]}, got shape {shape}")
        return kind
    fits = [k for _, _, k in table if _LAYOUT_SHAPES[k][1](shape)]
    if len(fits) > 1:
        raise ValueError(f"{what}: shape {shape} fits both "
                         + " and ".join(f"{_LAYOUT_SHAPES[k][0]} ({_releases(backend, k)})"
                                        for k in fits) + "; pass vllm_version=")
    if not fits:
        shapes = " or ".join(f"{_LAYOUT_SHAPES[k][0]} ({_releases(backend, k)})"
                             for _, _, k in table)
        raise ValueError(f"{what}: expected {shapes} for {backend}, got shape {shape}")
    return fits[0]


def _releases(backend: str, kind: str) -> str:
    lo, hi = next((lo, hi) for lo, hi, k in VLLM_LAYOUTS[backend] if k == kind)
    return f"vLLM {lo[0]}.{lo[1]}" + ("" if lo == hi else f"-{hi[0]}.{hi[1]}")


def _vllm_kv(t: torch.Tensor, kind: str, head_size, what: str) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """K and V of one MHA layer tensor, each logical ``[blocks, block_size, heads, dim]``
    (``_nhd_or_hnd`` then reads the stride order)."""
    if kind == "kv_first":  # flash_attn <= 0.22: kv_cache.unbind(0)
        return t[0], t[1]
    if kind == "block_kv":  # flashinfer, triton_attn <= 0.25, flash_attn 0.23-0.25
        return t[:, 0], t[:, 1]
    width = t.shape[3]
    d = width // 2 if head_size is None else head_size
    if not is_int(d) or not 0 < d < width:
        raise ValueError(f"head_size: expected an int in (0, {width}) (K's part of the "
                         f"{width} values of each head), got {head_size!r}")
    # fused, >= 0.26: kv_cache.transpose(1, 2).split(head_size, -1)
    if t.shape[0] > 1 and t.shape[1] > 1 and t.stride(1) > t.stride(0):
        raise ValueError(f"{what}: heads outside blocks (KVCacheLayout LHBNC, strides "
                         f"{t.stride()}): a block's rows are spread over the whole layer, "
                         f"which PagedKVCache does not take (a page's rows must lie within "
                         f"one page stride)")
    return t[..., :d].transpose(1, 2), t[..., d:].transpose(1, 2)


def _cpu_blocks(t: torch.Tensor, kind: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one CPU-backend layer as whole blocks: ``[blocks, 1, kv_heads,
    block_size * head_size]``, one row per (block, head) holding the block's K (or V) plane.

    vLLM's CPU kernels (``csrc/cpu/cpu_attn_*.hpp``, ``reshape_and_cache``) keep each (block,
    head)'s K column-major, ``[head_size, block_size]`` (AMX: in its own tiles), and V
    row-major ``[block_size, head_size]``: a token's K is not a row, so the pool is moved by
    whole blocks, whose bytes mean the same on both sides only with the same block size and
    the same kernel ISA."""
    if kind == "cpu_paged":
        raise ValueError(f"{what}: {_CPU_PAGED}; cpkv cannot view it without a copy")
    if kind == "cpu_kv_first":  # 0.12-0.22: kv_cache.unbind(0), each [blocks, heads, bs, dim]
        planes = [t[0], t[1]]
    else:  # >= 0.23: kv_cache.view(blocks, heads, 2 * bs, dim).chunk(2, dim=2) (cpu_attn.py)
        blocks, heads, bs, width = t.shape
        if width % 2 or t.stride(3) != 1 or (bs > 1 and t.stride(2) != width):
            raise ValueError(f"{what}: expected each (block, head) of the CPU layout "
                             f"contiguous ([block_size, 2 * head_size], strides ({width}, 1)), "
                             f"got shape {tuple(t.shape)}, strides {t.stride()}")
        halves = t.view(blocks, heads, 2, bs, width // 2)
        planes = [halves[:, :, 0], halves[:, :, 1]]
    out = []
    for plane in planes:  # [blocks, heads, bs, dim], each (block, head) contiguous
        blocks, heads, bs, dim = plane.shape
        if plane.stride(3) != 1 or (bs > 1 and plane.stride(2) != dim):
            raise ValueError(f"{what}: expected each (block, head) plane contiguous "
                             f"([block_size, head_size]), got strides {plane.stride()}")
        out.append(plane.as_strided((blocks, 1, heads, bs * dim),
                                    (plane.stride(0), bs * dim, plane.stride(1), 1)))
    return out[0], out[1]


def _nhd_or_hnd(k: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A logical ``[blocks, block_size, heads, dim]`` view, presented in the layout its
    strides say it is stored in (vLLM's HND stride order keeps the logical NHD shape)."""
    if k.shape[1] > 1 and k.shape[2] > 1 and k.stride(2) > k.stride(1):
        return k.transpose(1, 2), "HND"
    return k, "NHD"


def from_vllm(kv_caches, *, backend: str, vllm_version=None, head_size: int | None = None,
              cpu_isa: str | None = None,
              extras: Mapping[str, Sequence[torch.Tensor]] | None = None, indexer=None,
              index_head_dim: int = 128) -> PagedKVCache:
    """vLLM's per-layer KV cache tensors (``GPUModelRunner.kv_caches`` or the dict a KV
    connector's ``register_kv_caches`` receives; dict order is layer order), zero-copy.

    What each release hands over per layer (stride orders are read from the strides; a
    layout no strided view expresses raises with the reason):

    - ``"flash_attn"``: 0.11-0.22 ``[2, num_blocks, block_size, kv_heads, head_size]``
      (``FlashAttentionBackend.get_kv_cache_shape``, NHD or HND stride order); 0.23-0.25
      ``[num_blocks, 2, block_size, kv_heads, head_size]``; from 0.26 the fused per-head
      ``[num_blocks, kv_heads, block_size, 2 * head_size]``: physically block, token, head,
      then K and V side by side (``get_kv_cache_stride_order`` NHD ``(0, 2, 1, 3)``; read with
      ``kv_cache.transpose(1, 2).split(head_size, -1)``); from 0.29 the same logical view
      comes from ``create_kv_cache_views`` (``vllm/v1/kv_cache_interface.py``) in any
      ``KVCacheLayout`` (``LBNHC``, ``LBHNC``, ``LHBNC``, ``BLHNC``...).
    - ``"flashinfer"`` and ``"triton_attn"``: up to 0.25
      ``[num_blocks, 2, block_size, kv_heads, head_size]``; from 0.26 fused as flash_attn.
    - ``"cpu"``: 0.11 ``[2, num_blocks, block_size * kv_heads * head_size]`` is refused (the
      TorchSDPA paged layout); 0.12-0.22 ``[2, num_blocks, kv_heads, block_size, head_size]``
      (``CPUAttentionBackend``, ``kv_cache.unbind(0)``); from 0.23 ``[num_blocks, kv_heads,
      block_size, 2 * head_size]``, which ``cpu_attn.py`` reads as ``view(num_blocks,
      kv_heads, 2 * block_size, head_size).chunk(2, dim=2)`` (K plane, then V plane per block
      and head; layout ``LBHNC``). Inside a plane the kernels (``csrc/cpu/cpu_attn_*.hpp``)
      keep K column-major ``[head_size, block_size]`` (AMX: tiled) and V row-major, so a
      token's K is no row: the view is block-granular, each vLLM block one page of page_size
      1 with components "k_blocks" and "v_blocks" of ``[num_blocks, 1, kv_heads, block_size *
      head_size]`` (``cpu_isa`` is appended to the names, e.g. "k_blocks.vec", so that two
      pools of different kernel ISAs never exchange blocks: their formats differ).
    - ``"mla"``: up to 0.28 ``[num_blocks, block_size, head_size]`` (e.g. 576, or 656 uint8
      bytes for fp8 with inline scales), from 0.29 ``[num_blocks, 1, block_size, head_size]``
      -> "latent".

    Args:
        kv_caches: per-layer tensors, a list or a dict (layer order).
        backend: one of ``VLLM_BACKENDS``; ``"rocm_aiter"`` (the 5-D vectorized K layout)
            is refused with the reason.
        vllm_version: the release that allocated the tensors (e.g. ``vllm.__version__``):
            its layout is used and the shape checked against it. None: the layout is the
            one the shape can only be (a 5-D flash_attn tensor with 2 blocks fits two
            releases' layouts and needs the version).
        head_size: K's values per head in a fused layout (default: half of the last axis);
            V has the rest (``head_size_v``).
        cpu_isa: the CPU attention kernels' ISA (``layer.isa``: "vec", "amx", "neon"...),
            which decides the bytes inside a block; part of the component names.
        extras (flash_attn / flashinfer, 5-D layouts): more per-layer buffers addressed like
            K, logical ``[num_blocks, block_size, kv_heads, dim]`` in the same stride order
            (e.g. per-head fp8/fp4 scale caches), added as components of those names.
        indexer (mla): the DeepSeek V3.2 indexer layers' caches, per layer uint8
            ``[num_blocks, block_size, index_head_dim + 4]`` (from 0.29 with a head axis of 1
            after the blocks; ``DeepseekV32IndexerBackend``: its
            ``indexer_k_quant_and_cache`` writes each block's values, then each block's fp32
            scales) -> components "index_k" and "index_k_scale". ROCm's tile-shuffled indexer
            layout is not a strided view.

    Returns a ``PagedKVCache`` with components "k", "v" (+ extras), "k_blocks", "v_blocks"
    (cpu, page size 1: one token of cpkv is one vLLM block), or "latent" (+ indexer);
    vLLM's block ``b`` is page ``b`` (where vLLM splits its blocks into smaller kernel blocks,
    0.29+, the tensors it hands over are in kernel blocks, and so are the pages).

    Example::

        cache = from_vllm(kv_caches, backend="flash_attn", vllm_version=vllm.__version__)
    """
    if backend in UNVIEWABLE:
        raise ValueError(f"backend {backend!r}: {UNVIEWABLE[backend]}; cpkv cannot view it "
                         f"without a copy")
    if backend not in VLLM_BACKENDS:
        raise ValueError(f"backend: expected one of {VLLM_BACKENDS}, got {backend!r}")
    layers = _layers(kv_caches, "kv_caches")
    kinds = [_vllm_layout(t, backend, vllm_version, f"kv_caches[{i}]")
             for i, t in enumerate(layers)]
    if backend == "mla":
        if extras:
            raise ValueError("extras: only for the flash_attn and flashinfer backends")
        latent = [t[:, 0] if kind == "latent_head" else t
                  for t, kind in zip(layers, kinds, strict=True)]
        comps = {"latent": latent}
        if indexer is not None:
            index = [t[:, 0] if t.dim() == 4 and t.shape[1] == 1 else t
                     for t in _layers(indexer, "indexer")]
            comps.update(_indexer_components(index, latent[0].shape[1], index_head_dim,
                                             latent[0].shape[0], "indexer"))
        return PagedKVCache(comps, latent=tuple(comps))
    if indexer is not None:
        raise ValueError("indexer: only for the mla backend")
    if extras and any(k not in ("kv_first", "block_kv") for k in kinds):
        raise ValueError("extras: only for the 5-D flash_attn and flashinfer layouts")
    if backend == "cpu":
        suffix = "" if cpu_isa is None else f".{cpu_isa}"
        names = ("k_blocks" + suffix, "v_blocks" + suffix)
        comps = {n: [] for n in names}
        for i, (t, kind) in enumerate(zip(layers, kinds, strict=True)):
            for name, part in zip(names, _cpu_blocks(t, kind, f"kv_caches[{i}]"), strict=True):
                comps[name].append(part)
        return PagedKVCache(comps)
    comps: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    layouts = set()
    for i, (t, kind) in enumerate(zip(layers, kinds, strict=True)):
        for name, part in zip(("k", "v"), _vllm_kv(t, kind, head_size, f"kv_caches[{i}]"),
                              strict=True):
            view, lay = _nhd_or_hnd(part)
            comps[name].append(view)
            layouts.add(lay)
    for name, bufs in (extras or {}).items():
        if name in comps:
            raise ValueError(f"extras: component name {name!r} is taken by K/V")
        comps[name] = []
        for i, t in enumerate(_layers(bufs, f"extras[{name!r}]")):
            _check_dims(t, 4, f"extras[{name!r}][{i}]",
                        "[num_blocks, block_size, kv_heads, dim] (logical)")
            view, lay = _nhd_or_hnd(t)
            comps[name].append(view)
            layouts.add(lay)
    if len(layouts) != 1:
        raise ValueError(f"kv_caches: expected one stride order for every layer and "
                         f"component, got both NHD and HND ({sorted(layouts)})")
    return PagedKVCache(comps, layout=layouts.pop())


def from_flashinfer(paged_kv_caches, *, layout: str) -> PagedKVCache:
    """FlashInfer's paged KV cache, per layer (``flashinfer/page.py``, the ``paged_kv_cache``
    argument of its batch prefill/decode wrappers).

    Each layer is one tensor ``[max_pages, 2, page_size, kv_heads, head_dim]`` (NHD) /
    ``[max_pages, 2, kv_heads, page_size, head_dim]`` (HND), or a ``(k_cache, v_cache)``
    tuple of ``[max_pages, page_size, kv_heads, head_dim]`` (NHD) /
    ``[max_pages, kv_heads, page_size, head_dim]`` (HND) tensors.

    Example::

        cache = from_flashinfer([kv_layer0, kv_layer1], layout="NHD")
    """
    _check_layout(layout)
    if isinstance(paged_kv_caches, (torch.Tensor, tuple)):
        raise TypeError("paged_kv_caches: expected a list with one entry per layer (a tensor or "
                        "a (k, v) tuple), got a single " + type(paged_kv_caches).__name__)
    shape4 = "[max_pages, page_size, kv_heads, head_dim]" if layout == "NHD" else \
        "[max_pages, kv_heads, page_size, head_dim]"
    ks, vs = [], []
    for i, entry in enumerate(_layers_or_tuples(paged_kv_caches)):
        if isinstance(entry, tuple):
            if len(entry) != 2:
                raise ValueError(f"paged_kv_caches[{i}]: expected a (k, v) tuple, got "
                                 f"{len(entry)} tensors")
            for j, t in enumerate(entry):
                _check_dims(t, 4, f"paged_kv_caches[{i}][{j}]", shape4)
            k, v = entry
        else:
            _check_dims(entry, 5, f"paged_kv_caches[{i}]", shape4.replace("[max_pages,",
                                                                          "[max_pages, 2,"))
            if entry.shape[1] != 2:
                raise ValueError(f"paged_kv_caches[{i}]: expected axis 1 of size 2 (K, V), "
                                 f"got shape {tuple(entry.shape)}")
            k, v = entry[:, 0], entry[:, 1]
        ks.append(k)
        vs.append(v)
    return PagedKVCache.mha(ks, vs, layout=layout)


def _layers_or_tuples(entries) -> list:
    if not isinstance(entries, Sequence) or not entries:
        raise ValueError("paged_kv_caches: expected a non-empty list of per-layer entries")
    for i, e in enumerate(entries):
        ok = isinstance(e, torch.Tensor) or (isinstance(e, tuple) and
                                              all(isinstance(t, torch.Tensor) for t in e))
        if not ok:
            raise TypeError(f"paged_kv_caches[{i}]: expected a tensor or a (k, v) tuple of "
                            f"tensors, got {type(e).__name__}")
    return list(entries)
