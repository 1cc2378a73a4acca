"""Test helpers: pools filled with random bytes, an index-walk oracle, byte-exact asserts."""

from __future__ import annotations

import os

import torch

from cpkv import ComponentSpec, PagedKVCache

SENTINEL = 0xA5  # poison byte for outputs and guarded destinations
GUARD = 64  # poisoned bytes past the packed size that must stay poisoned


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of t's bytes (last dim scaled by itemsize)."""
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def fill_random(cache: PagedKVCache, seed: int = 0) -> PagedKVCache:
    g = torch.Generator().manual_seed(seed)
    for layers in cache.buffers.values():
        for t in layers:
            b = as_bytes(t)
            b.copy_(torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8))
    return cache


def fill_sentinel(cache: PagedKVCache) -> PagedKVCache:
    for layers in cache.buffers.values():
        for t in layers:
            as_bytes(t).fill_(SENTINEL)
    return cache


def snapshot(cache: PagedKVCache) -> dict:
    return {n: [as_bytes(t).clone() for t in ls] for n, ls in cache.buffers.items()}


def make_cache(specs, *, num_layers, num_pages, page_size, layout="NHD", seed=0,
               strided=None) -> PagedKVCache:
    """A pool of random bytes. strided="heads" views heads [1, 1+H) of a buffer with H+2 heads;
    strided="pages" views every other page of a buffer twice as long."""
    if strided is None:
        cache = PagedKVCache.empty(specs, num_layers=num_layers, num_pages=num_pages,
                                   page_size=page_size, layout=layout)
        return fill_random(cache, seed)
    comps = {}
    for s in specs:
        pages = num_pages * (2 if strided == "pages" else 1)
        heads = s.num_heads + (2 if strided == "heads" else 0)
        shape = (num_layers, pages, page_size, heads, s.head_dim) if layout == "NHD" else \
            (num_layers, pages, heads, page_size, s.head_dim)
        big = torch.empty(shape, dtype=s.dtype)
        hdim = 3 if layout == "NHD" else 2
        view = big[:, ::2] if strided == "pages" else big.narrow(hdim, 1, s.num_heads)
        comps[s.name] = view
    cache = PagedKVCache(comps, layout=layout, stacked=True)
    assert not cache.layer(specs[0].name, 0).is_contiguous()
    return fill_random(cache, seed)


def mha(num_heads=2, head_dim=96, dtype=torch.bfloat16):
    return [ComponentSpec("k", num_heads, head_dim, dtype), ComponentSpec("v", num_heads, head_dim,
                                                                          dtype)]


def mla(dim=576, dtype=torch.bfloat16):
    return [ComponentSpec("latent", 1, dim, dtype)]


def three(num_heads=2):
    """K and V in fp8, plus per-head fp32 scales: three components, two dtypes."""
    return [ComponentSpec("k", num_heads, 64, torch.float8_e4m3fn),
            ComponentSpec("v", num_heads, 64, torch.float8_e4m3fn),
            ComponentSpec("scale", num_heads, 1, torch.float32)]


def oracle_pack(cache: PagedKVCache, page_ids, num_tokens, layers: range, heads: range):
    """Expected packed bytes by walking tokens one by one (independent of cpkv.kernels)."""
    return oracle_pack_tokens(cache, page_ids, range(num_tokens), layers, heads)


def oracle_pack_tokens(cache: PagedKVCache, page_ids, tokens, layers: range, heads: range):
    """The packed slot of the request-local ``tokens`` (any sequence), in that order."""
    ps = cache.page_size
    ids = [int(i) for i in page_ids]
    parts = []
    for layer in layers:
        for spec in cache.components:
            pool = as_bytes(cache.nhd_view(spec.name, layer))
            for t in tokens:
                parts.append(pool[ids[t // ps], t % ps, heads.start:heads.stop].reshape(-1))
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def oracle_pack_regions(cache: PagedKVCache, page_ids, num_tokens, region_tokens,
                        layers: range, heads: range):
    """A slot cut into values of ``region_tokens``: value v is the packed slot of tokens
    [v R, v R + R), values back to back."""
    parts = [oracle_pack_tokens(cache, page_ids, range(v, v + region_tokens), layers, heads)
             for v in range(0, num_tokens, region_tokens)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def oracle_unpack(src: PagedKVCache, src_ids, dst: PagedKVCache, dst_ids, num_tokens,
                  layers: range, src_heads: range, dst_layers: range, dst_heads: range,
                  want: dict | None = None) -> dict:
    """Expected destination bytes after moving tokens src -> dst one by one (on top of `want`,
    a snapshot of dst by default)."""
    want = snapshot(dst) if want is None else want
    s_ids, d_ids = [int(i) for i in src_ids], [int(i) for i in dst_ids]
    for sl, dl in zip(layers, dst_layers, strict=True):
        for spec in src.components:
            s_pool = as_bytes(src.nhd_view(spec.name, sl))
            d_pool = want[spec.name][dl]
            if dst.layout == "HND":
                d_pool = d_pool.transpose(1, 2)
            for t in range(num_tokens):
                row = s_pool[s_ids[t // src.page_size], t % src.page_size,
                             src_heads.start:src_heads.stop]
                d_pool[d_ids[t // dst.page_size], t % dst.page_size,
                       dst_heads.start:dst_heads.stop] = row
    return want


def assert_bytes_equal(got: torch.Tensor, want: torch.Tensor, what: str, names=None):
    """torch.equal on bytes; on mismatch name the first few differing indices and values."""
    got, want = as_bytes(got), as_bytes(want)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if torch.equal(got, want):
        return
    diff = (got != want).nonzero()
    names = names or [f"d{i}" for i in range(got.dim())]
    lines = []
    for idx in diff[:5].tolist():
        where = ", ".join(f"{n}={i}" for n, i in zip(names, idx, strict=True))
        lines.append(f"  ({where}): got {int(got[tuple(idx)])}, want {int(want[tuple(idx)])}")
    raise AssertionError(f"{what}: {len(diff)} bytes differ, first:\n" + "\n".join(lines))


def assert_cache_equals(cache: PagedKVCache, want: dict, what: str = "pool"):
    names = ["page", "slot", "head", "byte"] if cache.layout == "NHD" else \
        ["page", "head", "slot", "byte"]
    for n, layers in cache.buffers.items():
        for i, t in enumerate(layers):
            assert_bytes_equal(t, want[n][i], f"{what} {n!r} layer {i}", names)


def full_kv(specs, num_layers, total_len, seed=0) -> dict:
    """Random KV for every token of a batch: name -> [layers, total_len, heads, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in specs:
        t = torch.empty(num_layers, total_len, s.num_heads, s.head_dim, dtype=s.dtype)
        b = as_bytes(t)
        b.copy_(torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8))
        out[s.name] = t
    return out


def oracle_sequence_pool(cache: PagedKVCache, full: dict, seq_lens, page_lists,
                         layers: range) -> dict:
    """Expected pool after the full batch KV is written in sequence order, token by token."""
    want = snapshot(cache)
    ps, p = cache.page_size, 0
    for n, ids in zip(seq_lens, page_lists, strict=True):
        ids = [int(i) for i in ids]
        for t in range(n):
            for i, layer in enumerate(layers):
                for spec in cache.components:
                    pool = want[spec.name][layer]
                    if cache.layout == "HND":
                        pool = pool.transpose(1, 2)
                    pool[ids[t // ps], t % ps] = as_bytes(full[spec.name][i, p])
            p += 1
    return want


def gathered_oracle(cache: PagedKVCache, full: dict, plan, layers: range, seed=7):
    """The all-gather result, built row by row: rank regions of padded_len tokens, junk padding."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for pos in plan.positions:
        for i in range(len(layers)):
            for spec in cache.components:
                rows = [as_bytes(full[spec.name][i, int(p)]).reshape(-1) for p in pos]
                pad = (plan.padded_len - len(pos)) * spec.num_heads * spec.head_nbytes
                rows.append(torch.randint(0, 256, (pad,), generator=g, dtype=torch.uint8))
                parts.append(torch.cat(rows))
    return torch.cat(parts)


def local_shard(full: dict, plan, rank: int) -> dict:
    """Rank's K/V rows, in its local order: name -> [layers, n_local, heads, head_dim]."""
    return {n: t[:, plan.positions[rank]] for n, t in full.items()}


def disjoint_page_lists(num_pages: int, seq_lens, page_size: int, seed=0):
    """Random distinct pages per sequence, int32/int64 alternating."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)
    out, pos = [], 0
    for s, n in enumerate(seq_lens):
        k = -(-n // page_size)
        out.append(perm[pos:pos + k].to(torch.int32 if s % 2 else torch.int64))
        pos += k
    return out


# -- the kernel device: compiled Triton on CUDA tensors where CUDA exists, else the interpreter
# on CPU tensors. Tests build pools and oracles on the CPU and run the kernel under test on
# `kernel_device(backend)` through these helpers, comparing on the CPU.

KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# KVTEST_FORCE_MOVE=1 makes `pool_on` copy even to the same device and mark the copy, so a CPU
# run can check that every kernel call goes through the moving helpers (as on a CUDA host).
FORCE_MOVE = os.environ.get("KVTEST_FORCE_MOVE") == "1"


def kernel_device(backend: str) -> torch.device:
    """Where a test runs ``backend``: Triton on the kernel device, torch on the CPU."""
    return KERNEL_DEVICE if backend == "triton" else torch.device("cpu")


def same_layout(t: torch.Tensor, device, *, force: bool = False) -> torch.Tensor:
    """``t`` on ``device`` with its storage copied whole: same storage offset and strides, so a
    strided view (head slice, every other page) stays one. No copy when already there."""
    device = torch.device(device)
    if t.device == device and not force:
        return t
    storage = t.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        storage, 0, (storage.nbytes(),), (1,))
    moved = flat.to(device, copy=True).untyped_storage()
    return torch.empty(0, dtype=t.dtype, device=device).set_(moved, t.storage_offset(),
                                                             t.shape, t.stride())


def pool_on(cache: PagedKVCache, device, *, force: bool = False) -> PagedKVCache:
    """A copy of ``cache`` on ``device`` with every layer tensor's layout kept (or ``cache``)."""
    force = force or FORCE_MOVE
    if torch.device(device) == cache.device and not force:
        return cache
    moved = PagedKVCache({n: [same_layout(t, device, force=force) for t in ts]
                          for n, ts in cache.buffers.items()}, layout=cache.layout)
    moved.on_kernel_device = True
    return moved


def copy_back(moved: PagedKVCache, cache: PagedKVCache) -> None:
    """Write a moved pool's bytes back into the CPU pool it came from (its visible elements)."""
    if moved is cache:
        return
    for name, ts in cache.buffers.items():
        for t, m in zip(ts, moved.buffers[name], strict=True):
            as_bytes(t).copy_(as_bytes(m))


def on(x, device):
    """A tensor moved to ``device``; anything else (list, numpy ids) as is."""
    return x.to(device) if isinstance(x, torch.Tensor) else x


def assert_untouched_outside(dst, before, pages):
    """Every page but ``pages`` (a failed request's: undefined bytes, DESIGN rule 3) still
    holds its bytes from ``before`` (an NHD snapshot)."""
    for name, layers in snapshot(dst).items():
        for i, t in enumerate(layers):
            before[name][i][pages] = t[pages]
    assert_cache_equals(dst, before, "pages outside the request")


# -- pack and round-trip checks shared by the kernel tests: the call under test runs on
# `kernel_device(backend)`, the comparison on the CPU.

def check_pack(cache, ids, num_tokens, backend, *, layers=None, heads=None, want=None,
               **kwargs):
    """Pack (``kwargs`` go to `pack_pages`, e.g. ``region_tokens``) into a poisoned buffer; the
    packed bytes equal ``want`` (default: the oracle of tokens [0, num_tokens)) and the guard
    past them is intact. Returns the packed bytes (CPU)."""
    from cpkv.kernels import pack_pages

    lr = range(cache.num_layers) if layers is None else range(*layers)
    hr = range(cache.num_heads) if heads is None else range(*heads)
    want = oracle_pack(cache, ids, num_tokens, lr, hr) if want is None else want
    nbytes = want.numel()
    dev = kernel_device(backend)
    out = torch.full((nbytes + GUARD,), SENTINEL, dtype=torch.uint8, device=dev)
    got = pack_pages(pool_on(cache, dev), on(ids, dev), num_tokens=num_tokens, layers=layers,
                     heads=heads, out=out, backend=backend, **kwargs)
    assert got.numel() == nbytes and (nbytes == 0 or got.data_ptr() == out.data_ptr())
    assert_bytes_equal(got.cpu(), want, "packed")
    assert bool((out[nbytes:] == SENTINEL).all()), "pack wrote past the packed size"
    return got.cpu()


def round_trip(src, dst, src_ids, dst_ids, num_tokens, backend, *, layers=None, heads=None,
               dst_layers=None, dst_heads=None, oracle=None, pack_kw=None, unpack_kw=None,
               **kwargs):
    """Pack from src, unpack into a sentinel-filled dst; compare dst with the oracle, all bytes.

    ``kwargs`` go to both calls (e.g. ``region_tokens``), ``pack_kw`` / ``unpack_kw`` to one;
    ``oracle()`` (called after the fill) gives the expected destination, by default the tokens
    [0, num_tokens) moved one by one."""
    from cpkv.kernels import pack_pages, unpack_pages

    fill_sentinel(dst)
    lr = range(src.num_layers) if layers is None else range(*layers)
    hr = range(src.num_heads) if heads is None else range(*heads)
    dlr = range(dst.num_layers) if dst_layers is None else range(*dst_layers)
    dhr = range(dst.num_heads) if dst_heads is None else range(*dst_heads)
    want = oracle() if oracle is not None else \
        oracle_unpack(src, src_ids, dst, dst_ids, num_tokens, lr, hr, dlr, dhr)
    dev = kernel_device(backend)
    packed = pack_pages(pool_on(src, dev), on(src_ids, dev), num_tokens=num_tokens,
                        layers=layers, heads=heads, backend=backend,
                        **{**kwargs, **(pack_kw or {})})
    fmt = src.packed_format(num_tokens, layers=layers, heads=heads,
                            region_tokens=kwargs.get("region_tokens"))
    moved = pool_on(dst, dev)
    unpack_pages(packed, moved, on(dst_ids, dev), num_tokens=num_tokens, layers=dst_layers,
                 heads=dst_heads, format=fmt, backend=backend, **{**kwargs, **(unpack_kw or {})})
    copy_back(moved, dst)
    assert_cache_equals(dst, want, "destination")
    return packed.cpu()
