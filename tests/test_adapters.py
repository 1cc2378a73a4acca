"""cpkv.adapters: every runner pool viewed without a copy, checked against an oracle that
addresses each pool the way its runner does (SGLang token slots, vLLM/FlashInfer blocks)."""

import pytest
import torch
from kvtest import as_bytes

from cpkv import PagedKVCache
from cpkv.adapters import from_flashinfer, from_sglang_mha, from_sglang_mla, from_vllm
from cpkv.kernels import pack_pages, unpack_pages

PS, PAGES, LAYERS = 4, 5, 2


def _rand(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(*shape, dtype=dtype)
    as_bytes(t).copy_(torch.randint(0, 256, as_bytes(t).shape, generator=g, dtype=torch.uint8))
    return t


def _oracle_pack(rows, names, ids, num_tokens):
    """Packed bytes from the runner's own addressing: rows(name, layer, page, slot) -> [H, D]."""
    parts = []
    for layer in range(LAYERS):
        for name in names:
            toks = [rows(name, layer, ids[t // PS], t % PS) for t in range(num_tokens)]
            parts.append(as_bytes(torch.stack(toks)).reshape(-1))
    return torch.cat(parts)


def _same_storage(cache, name, layer, runner_tensor):
    got = cache.layer(name, layer)
    assert got.untyped_storage().data_ptr() == runner_tensor.untyped_storage().data_ptr()


def _check(cache, rows, names, runner_tensors):
    """Reads (pack, both backends) and writes (through the view) land where the runner
    addresses them."""
    assert cache.component_names == names
    for layer in range(LAYERS):
        for name in names:
            _same_storage(cache, name, layer, runner_tensors(name, layer))
    ids = [3, 1, 4]
    want = _oracle_pack(rows, names, ids, 2 * PS + 1)
    for backend in ("torch", "triton"):
        got = pack_pages(cache, torch.tensor(ids), num_tokens=2 * PS + 1, backend=backend)
        assert torch.equal(got, want), backend
    for name in names:  # a write through cpkv's view is the runner's token
        view = cache.nhd_view(name, 1)
        as_bytes(view[2, 3]).fill_(0x5A)
        assert bool((as_bytes(rows(name, 1, 2, 3)) == 0x5A).all())


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_sglang_mha(layout):
    def buf(dim, seed):  # NHD: [size + page_size, H, D]; HND (use_hnd): [pages, H, ps, D]
        shape = (PAGES * PS, 2, dim) if layout == "NHD" else (PAGES, 2, PS, dim)
        return _rand(*shape, seed=seed)
    k = [buf(8, i) for i in range(LAYERS)]
    v = [buf(16, 10 + i) for i in range(LAYERS)]  # v_head_dim differs
    cache = from_sglang_mha(k, v, page_size=PS, layout=layout)
    assert (cache.num_pages, cache.page_size, cache.num_heads, cache.layout) == (PAGES, PS, 2,
                                                                                 layout)
    bufs = {"k": k, "v": v}

    def rows(n, layer, p, s):  # SGLang: token loc = page * ps + slot
        loc = p * PS + s
        t = bufs[n][layer]
        return t[loc] if layout == "NHD" else t[loc // PS, :, loc % PS]
    _check(cache, rows, ["k", "v"], lambda n, layer: bufs[n][layer])


def test_sglang_mha_fused_halves_and_extras():
    fused = [_rand(PAGES * PS, 4, 8, seed=i) for i in range(LAYERS)]  # K | V on the heads axis
    scales = [_rand(PAGES * PS, 2, 1, dtype=torch.float32, seed=7 + i) for i in range(LAYERS)]
    cache = from_sglang_mha([f[:, :2] for f in fused], [f[:, 2:] for f in fused], page_size=PS,
                            extras={"k_scale": scales})
    bufs = {"k": [f[:, :2] for f in fused], "v": [f[:, 2:] for f in fused], "k_scale": scales}

    def rows(n, layer, p, s):
        return bufs[n][layer][p * PS + s]
    _check(cache, rows, ["k", "v", "k_scale"], lambda n, layer: bufs[n][layer])


def test_sglang_mla_with_nsa_indexer():
    kv = [_rand(PAGES * PS, 1, 576, seed=i) for i in range(LAYERS)]
    index = [_rand(PAGES + 1, PS * (128 + 4), dtype=torch.uint8, seed=5 + i)
             for i in range(LAYERS)]
    cache = from_sglang_mla(kv, page_size=PS, index_k_with_scale=index)
    assert [(c.name, c.num_heads, c.head_dim) for c in cache.components] == [
        ("latent", 1, 576), ("index_k", 1, 128), ("index_k_scale", 1, 4)]

    def rows(n, layer, p, s):
        if n == "latent":
            return kv[layer][p * PS + s]
        page = index[layer][p]  # values of every slot, then the scales of every slot
        if n == "index_k":
            return page[s * 128:(s + 1) * 128].view(1, 128)
        return page[PS * 128 + s * 4: PS * 128 + (s + 1) * 4].view(1, 4)
    _check(cache, rows, ["latent", "index_k", "index_k_scale"],
           lambda n, layer: kv[layer] if n == "latent" else index[layer])


def _vllm_alloc(backend, hnd, seed):
    """Allocate as vLLM does: raw memory in the stride order, permuted to the logical shape."""
    if backend == "flash_attn":
        logical = (2, PAGES, PS, 2, 8)
        order = (0, 1, 3, 2, 4) if hnd else (0, 1, 2, 3, 4)
    else:
        logical = (PAGES, 2, PS, 2, 8)
        order = (0, 1, 3, 2, 4) if hnd else (0, 1, 2, 3, 4)
    raw = _rand(*[logical[i] for i in order], seed=seed)
    inv = [order.index(i) for i in range(5)]
    t = raw.permute(*inv)
    assert t.shape == logical
    return t


@pytest.mark.parametrize("hnd", [False, True], ids=["NHD", "HND-stride-order"])
@pytest.mark.parametrize("backend", ["flash_attn", "flashinfer"])
def test_vllm_mha(backend, hnd):
    kv = [_vllm_alloc(backend, hnd, seed=i) for i in range(LAYERS)]
    names = {f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(kv)}
    cache = from_vllm(names, backend=backend)
    assert cache.layout == ("HND" if hnd else "NHD")

    def rows(n, layer, b, s):
        which = 0 if n == "k" else 1
        return kv[layer][which, b, s] if backend == "flash_attn" else kv[layer][b, which, s]
    _check(cache, rows, ["k", "v"], lambda n, layer: kv[layer])


@pytest.mark.parametrize("hnd", [False, True], ids=["NHD", "HND-stride-order"])
def test_vllm_extras_follow_the_stride_order(hnd):
    kv = [_vllm_alloc("flash_attn", hnd, seed=i) for i in range(LAYERS)]
    raw = [_rand(*((PAGES, 2, PS, 4) if hnd else (PAGES, PS, 2, 4)), dtype=torch.uint8,
                 seed=20 + i) for i in range(LAYERS)]
    scales = [r.transpose(1, 2) if hnd else r for r in raw]  # logical [blocks, bs, H, 4]
    cache = from_vllm(kv, backend="flash_attn", extras={"kv_scale": scales})
    assert cache.layout == ("HND" if hnd else "NHD")

    def rows(n, layer, b, s):
        return scales[layer][b, s] if n == "kv_scale" else kv[layer][0 if n == "k" else 1, b, s]
    _check(cache, rows, ["k", "v", "kv_scale"],
           lambda n, layer: scales[layer] if n == "kv_scale" else kv[layer])
    with pytest.raises(ValueError, match="expected one stride order for every layer and comp"):
        from_vllm(kv, backend="flash_attn",
                  extras={"s": [r.transpose(1, 2) if not hnd else r.transpose(1, 2).contiguous()
                                for r in raw]})


# vLLM >= 0.29 (vllm/v1/kv_cache_layout.py): stride orders over the logical [L, B, H, N, C]
KV_CACHE_LAYOUTS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
                    "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}


def _vllm_views(order, heads=2, content=16, dtype=torch.bfloat16, seed=0):
    """Per-layer [B, H, N, C] views of one buffer, laid out in ``order`` as
    create_kv_cache_views (vllm/v1/kv_cache_interface.py, 0.29+) does."""
    shape = (LAYERS, PAGES, heads, PS, content)
    strides, step = [0] * 5, 1
    for dim in reversed(order):
        strides[dim] = step
        step *= shape[dim]
    raw = _rand(step, dtype=dtype, seed=seed)
    return list(raw.as_strided(shape, strides).unbind(0))


@pytest.mark.parametrize("order", list(KV_CACHE_LAYOUTS), ids=list(KV_CACHE_LAYOUTS))
def test_vllm_fused_per_head_kv(order):
    """vLLM 0.26+ GPU backends: [blocks, heads, block_size, K | V], read with
    kv_cache.transpose(1, 2).split(head_size, -1) (flash_attn.py), in every KVCacheLayout
    but LHBNC (ROCm's heads-outermost order), which is refused with the reason."""
    kv = _vllm_views(KV_CACHE_LAYOUTS[order])
    if order == "LHBNC":
        with pytest.raises(ValueError, match="heads outside blocks"):
            from_vllm(kv, backend="flash_attn")
        return
    cache = from_vllm({f"layers.{i}.attn": t for i, t in enumerate(kv)}, backend="flash_attn")
    assert (cache.num_pages, cache.page_size, cache.num_heads) == (PAGES, PS, 2)
    split = [t.transpose(1, 2).split(8, dim=-1) for t in kv]  # vLLM's own addressing

    def rows(n, layer, b, s):
        return split[layer][0 if n == "k" else 1][b, s]
    _check(cache, rows, ["k", "v"], lambda n, layer: kv[layer])


def test_vllm_fused_different_v_head_size():
    """head_size_v != head_size (flash_attn_diffkv): K's width is given."""
    kv = _vllm_views(KV_CACHE_LAYOUTS["LBNHC"], content=24)
    cache = from_vllm(kv, backend="triton_attn", head_size=16)
    assert [c.head_dim for c in cache.components] == [16, 8]

    def rows(n, layer, b, s):
        return kv[layer].transpose(1, 2).split(16, dim=-1)[0 if n == "k" else 1][b, s]
    _check(cache, rows, ["k", "v"], lambda n, layer: kv[layer])


def _cpu_reshape_and_cache(key_cache, value_cache, slot, k, v):
    """vLLM's CPU kernels' write of one token (csrc/cpu/cpu_attn_vec.hpp, reshape_and_cache):
    per (block, head), K column-major [head_size, block_size], V row-major."""
    bs = key_cache.shape[2]
    b, s = divmod(slot, bs)
    for h in range(k.shape[0]):
        key_cache[b, h].reshape(-1)[s::bs].copy_(k[h])
        value_cache[b, h, s].copy_(v[h])


def _cpu_planes(t):
    """The K and V planes as cpu_attn.py splits a 0.23+ layer (view + chunk) or a 0.12-0.22
    one (unbind)."""
    if t.dim() == 5:
        return t.unbind(0)
    blocks, heads, bs, width = t.shape
    return t.view(blocks, heads, 2 * bs, width // 2).chunk(2, dim=2)


@pytest.mark.parametrize("version", ["0.12.0", "0.23.0", "0.32.0"])
def test_vllm_cpu_blocks(version):
    """vLLM's CPU backend: a token's K is no row (column-major inside the block), so blocks
    move whole; pack/unpack of a request's blocks reproduces every token the kernel wrote."""
    def pool(seed):
        if version == "0.12.0":  # [2, blocks, heads, block_size, head_size]
            return [_rand(2, PAGES, 2, PS, 8, seed=seed + i) for i in range(LAYERS)]
        return _vllm_views(KV_CACHE_LAYOUTS["LBHNC"], seed=seed)  # [blocks, H, bs, 2 * D]
    src, dst = pool(0), pool(10)
    cache = from_vllm(src, backend="cpu", vllm_version=version, cpu_isa="vec")
    assert cache.component_names == ["k_blocks.vec", "v_blocks.vec"]
    assert (cache.num_pages, cache.page_size, cache.num_heads) == (PAGES, 1, 2)
    _same_storage(cache, "k_blocks.vec", 1, src[1])
    g = torch.Generator().manual_seed(3)
    tokens = {}
    for layer in range(LAYERS):  # the kernel writes tokens into blocks 3 and 1
        for slot in [3 * PS, 3 * PS + 2, 1 * PS + 1]:
            k, v = (torch.randn(2, 8, generator=g).to(torch.bfloat16) for _ in "kv")
            _cpu_reshape_and_cache(*_cpu_planes(src[layer]), slot, k, v)
            tokens[layer, slot] = k, v
    ids = [3, 1]
    want = torch.cat([as_bytes(p[b]).reshape(-1) for layer in range(LAYERS)
                      for p in _cpu_planes(src[layer]) for b in ids])
    for backend in ("torch", "triton"):
        assert torch.equal(pack_pages(cache, torch.tensor(ids), num_tokens=2, backend=backend),
                           want), backend
    # into another pool's blocks 0 and 4: the kernel's addressing reads the same tokens
    out = from_vllm(dst, backend="cpu", cpu_isa="vec")
    guard = [t.clone() for t in dst]
    unpack_pages(pack_pages(cache, torch.tensor(ids), num_tokens=2), out, torch.tensor([0, 4]),
                 num_tokens=2, format=cache.packed_format(2))
    moved = {3: 0, 1: 4}
    for (layer, slot), (k, v) in tokens.items():
        b, s = divmod(slot, PS)
        kc, vc = _cpu_planes(dst[layer])
        assert torch.equal(kc[moved[b]].reshape(2, -1)[:, s::PS], k)
        assert torch.equal(vc[moved[b], :, s], v)
    for layer in range(LAYERS):  # blocks 1-3 of the destination untouched
        for p_new, p_old in zip(_cpu_planes(dst[layer]), _cpu_planes(guard[layer]), strict=True):
            assert torch.equal(as_bytes(p_new[1:4]), as_bytes(p_old[1:4]))
    # a per-token reading of the K plane (rows of head_size) is not what the kernel wrote
    b, s = divmod(3 * PS + 2, PS)
    assert not torch.equal(_cpu_planes(src[0])[0][b, :, s], tokens[0, 3 * PS + 2][0])


def test_vllm_cpu_isa_in_the_format():
    """Two CPU pools of different kernel ISAs have different packed formats."""
    kv = _vllm_views(KV_CACHE_LAYOUTS["LBHNC"])
    vec = from_vllm(kv, backend="cpu", cpu_isa="vec").packed_format(1)
    amx = from_vllm(kv, backend="cpu", cpu_isa="amx").packed_format(1)
    with pytest.raises(ValueError, match="components expected"):
        amx.check_matches(vec)


def test_vllm_flash_attn_block_kv():
    """vLLM 0.23-0.25 flash_attn: [blocks, 2, block_size, heads, head_size]."""
    kv = [_vllm_alloc("flashinfer", False, seed=i) for i in range(LAYERS)]
    cache = from_vllm(kv, backend="flash_attn", vllm_version="0.24.0")

    def rows(n, layer, b, s):
        return kv[layer][b, 0 if n == "k" else 1, s]
    _check(cache, rows, ["k", "v"], lambda n, layer: kv[layer])


def test_vllm_mla_head_axis():
    """vLLM 0.29+ MLA: [blocks, 1, block_size, 576] (H == 1 in [B, H, N, C])."""
    kv = _vllm_views(KV_CACHE_LAYOUTS["LBHNC"], heads=1, content=576)
    cache = from_vllm(kv, backend="mla")
    _check(cache, lambda n, layer, b, s: kv[layer][b, 0, s].view(1, 576), ["latent"],
           lambda n, layer: kv[layer])


@pytest.mark.parametrize("call,message", [
    (lambda: from_vllm([_t(2, 4, 64)], backend="cpu"),
     "kv_caches[0]: vLLM 0.11's CPU backend (TorchSDPA) keeps [2, num_blocks, block_size * "
     "kv_heads * head_size]"),
    (lambda: from_vllm([_t(2, 2, 4, 2, 8)], backend="flash_attn"),
     "kv_caches[0]: shape (2, 2, 4, 2, 8) fits both [2, num_blocks, block_size, kv_heads, "
     "head_size] (vLLM 0.11-0.22) and [num_blocks, 2, block_size, kv_heads, head_size] "
     "(vLLM 0.23-0.25); pass vllm_version="),
    (lambda: from_vllm([_t(4, 2, 4, 16)], backend="flash_attn", vllm_version="0.22.1"),
     "kv_caches[0]: vLLM 0.22.1 flash_attn hands [2, num_blocks, block_size, kv_heads, "
     "head_size], got shape (4, 2, 4, 16)"),
    (lambda: from_vllm([_t(4, 2, 4, 16)], backend="cpu", vllm_version="0.10.2"),
     "vllm_version: layouts of backend 'cpu' are known for vLLM 0.11 through 0.33, "
     "got '0.10.2'"),
    (lambda: from_vllm([_t(4, 2, 4, 16)], backend="cpu", vllm_version="latest"),
     "vllm_version: expected a release such as '0.32.0', got 'latest'"),
    (lambda: from_vllm([_t(4, 2, 4, 16)], backend="flash_attn", head_size=16),
     "head_size: expected an int in (0, 16) (K's part of the 16 values of each head), got 16"),
    (lambda: from_vllm([_t(4, 2, 16, 4).transpose(2, 3)], backend="cpu"),
     "kv_caches[0]: expected each (block, head) of the CPU layout contiguous"),
    (lambda: from_vllm([_t(4, 2, 4, 16)], backend="flash_attn", extras={"s": [_t(4, 4, 2, 1)]}),
     "extras: only for the 5-D flash_attn and flashinfer layouts"),
])
def test_vllm_refused_by_version(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_vllm_mla():
    kv = [_rand(PAGES, PS, 656, dtype=torch.uint8, seed=i) for i in range(LAYERS)]
    cache = from_vllm(kv, backend="mla")
    _check(cache, lambda n, layer, b, s: kv[layer][b, s].view(1, 656), ["latent"],
           lambda n, layer: kv[layer])


def test_vllm_mla_with_indexer():
    kv = [_rand(PAGES, PS, 576, seed=i) for i in range(LAYERS)]
    index = [_rand(PAGES, PS, 132, dtype=torch.uint8, seed=3 + i) for i in range(LAYERS)]
    cache = from_vllm(kv, backend="mla", indexer=index)

    def rows(n, layer, b, s):
        if n == "latent":
            return kv[layer][b, s].view(1, 576)
        block = index[layer][b].reshape(-1)  # the block's values, then its fp32 scales
        if n == "index_k":
            return block[s * 128:(s + 1) * 128].view(1, 128)
        return block[PS * 128 + s * 4:PS * 128 + (s + 1) * 4].view(1, 4)
    _check(cache, rows, ["latent", "index_k", "index_k_scale"],
           lambda n, layer: kv[layer] if n == "latent" else index[layer])


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["fused", "tuple"])
def test_flashinfer(layout, form):
    shape = (PAGES, PS, 2, 8) if layout == "NHD" else (PAGES, 2, PS, 8)
    if form == "fused":
        kv = [_rand(PAGES, 2, *shape[1:], seed=i) for i in range(LAYERS)]
        entries = kv

        def rows(n, layer, p, s):
            t = kv[layer][p, 0 if n == "k" else 1]
            return t[s] if layout == "NHD" else t[:, s]

        def runner(n, layer):
            return kv[layer]
    else:
        kv = [(_rand(*shape, seed=i), _rand(*shape, seed=9 + i)) for i in range(LAYERS)]
        entries = kv

        def rows(n, layer, p, s):
            t = kv[layer][0 if n == "k" else 1][p]
            return t[s] if layout == "NHD" else t[:, s]

        def runner(n, layer):
            return kv[layer][0 if n == "k" else 1]
    cache = from_flashinfer(entries, layout=layout)
    _check(cache, rows, ["k", "v"], runner)


def _t(*shape, dtype=torch.bfloat16):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,message", [
    (lambda: from_vllm([_t(2, 4, 4, 2, 8)], backend="rocm_aiter"), ValueError,
     "backend 'rocm_aiter': vLLM's ROCm paged-attention / AITER layout stores K as 5-D"),
    (lambda: from_sglang_mha([_t(8, 2, 8)], [_t(8, 2, 8)], page_size=4,
                             scales_layout="interleaved"), ValueError,
     "scales_layout 'interleaved': SGLang's MXFP8 KV scales (page size 128) are interleaved"),
    (lambda: from_vllm([_t(2, 4, 4, 2, 8)], backend="xformers"), ValueError,
     "backend: expected one of ('flash_attn', 'flashinfer', 'triton_attn', 'cpu', 'mla'), "
     "got 'xformers'"),
    (lambda: from_vllm([_t(3, 4, 4, 2, 8)], backend="flash_attn"), ValueError,
     "kv_caches[0]: expected [2, num_blocks, block_size, kv_heads, head_size] (vLLM 0.11-0.22) "
     "or [num_blocks, 2, block_size, kv_heads, head_size] (vLLM 0.23-0.25) or [num_blocks, "
     "kv_heads, block_size, head_size + head_size_v] (K | V per head) (vLLM 0.26-0.33) for "
     "flash_attn, got shape (3, 4, 4, 2, 8)"),
    (lambda: from_vllm([_t(4, 4, 16)], backend="flashinfer"), ValueError,
     "kv_caches[0]: expected [num_blocks, 2, block_size, kv_heads, head_size] (vLLM 0.11-0.25) "
     "or [num_blocks, kv_heads, block_size, head_size + head_size_v] (K | V per head) "
     "(vLLM 0.26-0.33) for flashinfer, got shape (4, 4, 16)"),
    (lambda: from_vllm([_t(4, 4, 576)], backend="mla", extras={"s": [_t(4, 4, 1, 4)]}),
     ValueError, "extras: only for the flash_attn and flashinfer backends"),
    (lambda: from_vllm([_t(2, 4, 4, 2, 8)], backend="flash_attn", extras={"k": [_t(4, 4, 2, 1)]}),
     ValueError, "extras: component name 'k' is taken by K/V"),
    (lambda: from_vllm([_t(4, 4, 576)], backend="mla",
                       indexer=[_t(4, 4, 132, dtype=torch.uint8)[:, :, :130]]),
     ValueError, "indexer[0]: expected uint8 [>= 4 pages, 528] or [>= 4, 4, 132]"),
    (lambda: from_vllm([_t(4, 4, 576)], backend="mla",
                       indexer=[_t(4, 4, 264, dtype=torch.uint8)[:, :, ::2]]),
     ValueError, "indexer[0]: expected each page's bytes contiguous"),
    (lambda: from_vllm([_t(2, 4, 4, 2, 8)], backend="flash_attn",
                       indexer=[_t(4, 4, 132, dtype=torch.uint8)]),
     ValueError, "indexer: only for the mla backend"),
    (lambda: from_vllm([_t(4, 4, 1, 576)], backend="mla"), ValueError,
     "kv_caches[0]: expected [num_blocks, block_size, head_size] (vLLM 0.11-0.28) or "
     "[num_blocks, 1, block_size, head_size] (vLLM 0.29-0.33) for mla, got shape (4, 4, 1, 576)"),
    (lambda: from_vllm(_t(2, 4, 4, 2, 8), backend="flash_attn"), TypeError,
     "expected a list (or dict) of per-layer tensors"),
    (lambda: from_sglang_mha([_t(10, 2, 8)], [_t(10, 2, 8)], page_size=4), ValueError,
     "k[0]: expected a row count that is a multiple of page_size 4"),
    (lambda: from_sglang_mha([_t(8, 2, 8)], [_t(8, 2, 8)], page_size=0), ValueError,
     "page_size: expected a positive int, got 0"),
    (lambda: from_sglang_mha([_t(2, 4, 2, 8)], [_t(2, 4, 2, 8)], page_size=4), ValueError,
     "expected [size + page_size, heads, head_dim] (token-major) (3 dims)"),
    (lambda: from_sglang_mha([_t(8, 4, 8)], [_t(8, 4, 8)], page_size=4, layout="HND"),
     ValueError, "expected [num_pages, head_num, page_size, head_dim] (SGLang use_hnd) (4 dims)"),
    (lambda: from_sglang_mha([_t(2, 4, 8, 8)], [_t(2, 4, 8, 8)], page_size=4, layout="HND"),
     ValueError, "expected page_size 4 on axis 2"),
    # a V stored head_dim-major ([pages, heads, v_head_dim, page_size]) has no contiguous rows
    (lambda: from_sglang_mha([_t(2, 4, 4, 8)], [_t(2, 4, 8, 4).transpose(2, 3)], page_size=4,
                             layout="HND"), ValueError, "head_dim axis must be contiguous"),
    (lambda: from_sglang_mla([_t(8, 2, 576)], page_size=4), ValueError,
     "expected one latent head"),
    (lambda: from_sglang_mla([_t(8, 1, 576)], page_size=4,
                             index_k_with_scale=[_t(2, 4 * 132, dtype=torch.uint8)],
                             index_head_dim=100), ValueError, "a positive multiple of 128"),
    (lambda: from_sglang_mla([_t(8, 1, 576)], page_size=4,
                             index_k_with_scale=[_t(1, 4 * 132, dtype=torch.uint8)]),
     ValueError, "expected uint8 [>= 2 pages, 528]"),
    (lambda: from_flashinfer([_t(4, 3, 4, 2, 8)], layout="NHD"), ValueError,
     "expected axis 1 of size 2 (K, V)"),
    (lambda: from_flashinfer(_t(4, 2, 4, 2, 8), layout="NHD"), TypeError,
     "expected a list with one entry per layer"),
    (lambda: from_flashinfer([(_t(4, 4, 2, 8),)], layout="HND"), ValueError,
     "expected a (k, v) tuple, got 1 tensors"),
    (lambda: from_flashinfer([_t(4, 2, 4, 2, 8)], layout="XYZ"), ValueError,
     "layout: expected 'NHD' or 'HND'"),
])
def test_refused_layouts(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


def test_adapters_refuse_aliased_layers():
    """vLLM hybrid models may hand the same tensor for two layers: refused, not merged."""
    t = _t(2, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="component 'k' layer 0 and component 'k' layer 1 "
                                         "share memory"):
        from_vllm([t, t], backend="flash_attn")
    assert isinstance(from_vllm([t], backend="flash_attn"), PagedKVCache)


def test_adapters_api():
    import cpkv.adapters
    assert sorted(cpkv.adapters.__all__) == ["from_flashinfer", "from_sglang_mha",
                                             "from_sglang_mla", "from_vllm"]
