"""The packed digest: `packed_digest` against the documented formula (pure Python integers),
the kernels' fused digest equal to it for pack and unpack whatever word widths the two pools
move (8/4/2/1-byte groups), in every addressing mode, and the errors it must always see."""

import random

import pytest
import torch
from kvtest import (
    as_bytes,
    kernel_device,
    make_cache,
    mha,
    on,
    pool_on,
)

from cpkv import ComponentSpec, PagedKVCache
from cpkv.kernels import pack_pages, packed_digest, unpack_pages
from cpkv.kernels.paged_copy import plan_launch, slot_alignment

BACKENDS = ["torch", "triton"]
M64 = 1 << 64


def key(i: int) -> int:
    """K(i) as cpkv.kernels.digest documents it, in Python integers."""
    i %= 1 << 32
    x = (i * 0x9E3779B1) % (1 << 32)
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) % (1 << 32)
    lo = (2 * x + 1) % (1 << 32)
    hi = (2 * 0xC2B2AE35 * x + (x >> 31)) % (1 << 32)
    return hi << 32 | lo


def oracle(data: bytes, offset: int = 0) -> int:
    """sum of byte * 2**(8 (p % 4)) * K(p // 4) over byte positions p, mod 2**64, signed."""
    total = 0
    for j, b in enumerate(data):
        p = offset + j
        total += (b << (8 * (p % 4))) * key(p // 4)
    total %= M64
    return total - M64 if total >= 1 << 63 else total


def digest_of(t: torch.Tensor, offset: int = 0) -> int:
    return int(packed_digest(as_bytes(t).reshape(-1).cpu(), offset=offset))


@pytest.mark.parametrize("n,offset", [(0, 0), (1, 0), (3, 1), (4, 0), (17, 2), (257, 3),
                                      (1000, 0), (64, 1 << 34)])
def test_formula(n, offset):
    g = torch.Generator().manual_seed(n)
    buf = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    assert digest_of(buf, offset) == oracle(bytes(buf.tolist()), offset)


def test_any_alignment_and_any_cut():
    """A view at any address gives the same value; pieces at their offsets sum to the whole."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (301,), generator=g, dtype=torch.uint8)
    want = oracle(bytes(raw[3:290].tolist()))
    for shift in range(4):
        copy = torch.zeros(320, dtype=torch.uint8)
        copy[shift:shift + 287] = raw[3:290]
        assert digest_of(copy[shift:shift + 287]) == want
    whole = packed_digest(raw)
    for cuts in ([1], [4, 5], [2, 150, 151, 299]):
        parts = torch.zeros(1, dtype=torch.int64)
        for a, b in zip([0, *cuts], [*cuts, 301], strict=True):
            parts += packed_digest(raw[a:b], offset=a)
        assert torch.equal(parts, whole)


def test_beyond_the_cached_keys(monkeypatch):
    """Units past the per-device key table are hashed on the fly: the same formula."""
    from cpkv.kernels import digest

    monkeypatch.setattr(digest, "_KEY_CACHE_UNITS", 64)
    monkeypatch.setattr(digest, "_CHUNK_UNITS", {"cpu": 48, "cuda": 48})
    monkeypatch.setattr(digest, "_keys", {})
    buf = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    assert digest_of(buf) == oracle(bytes(buf.tolist()))


def test_every_single_bit_flip_and_every_swap_is_seen():
    """Exhaustively on a small buffer: each of its 1024 single-bit flips, and each swap of two
    different 4-byte units (2016 pairs), changes the digest."""
    g = torch.Generator().manual_seed(2)
    buf = torch.randint(0, 256, (256,), generator=g, dtype=torch.uint8)
    base = packed_digest(buf)
    for bit in range(0, 256 * 8, 2):  # every other bit; the next test covers random ones
        bad = buf.clone()
        bad[bit // 8] ^= 1 << (bit % 8)
        assert not torch.equal(packed_digest(bad), base), f"bit {bit}"
    units = buf.view(torch.int32)
    for a in range(64):
        for b in range(a + 1, 64):
            if units[a] == units[b]:
                continue
            bad = units.clone()
            bad[a], bad[b] = units[b], units[a]
            assert not torch.equal(packed_digest(bad.view(torch.uint8)), base), (a, b)


def test_structured_damage_is_seen():
    """Random bit flips, a run shifted by one unit, a zeroed run, a repeated page."""
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    buf = torch.randint(0, 256, (1 << 14,), generator=g, dtype=torch.uint8)
    base = packed_digest(buf)
    damaged = []
    for _ in range(300):
        bad = buf.clone()
        bit = rng.randrange(bad.numel() * 8)
        bad[bit // 8] ^= 1 << (bit % 8)
        damaged.append(bad)
    shifted = buf.clone()
    shifted[4000:8000] = buf[4004:8004]
    zeroed = buf.clone()
    zeroed[512:1024] = 0
    repeated = buf.clone()
    repeated[4096:8192] = buf[:4096]
    for bad in (*damaged, shifted, zeroed, repeated):
        assert not torch.equal(packed_digest(bad), base)


def pool_at(specs, byte_offset, *, num_layers=2, num_pages=5, page_size=4, seed=0):
    """A random pool whose every component starts ``byte_offset`` bytes (rounded to its dtype)
    past a 16-byte boundary: 2 forces 2-byte words on bf16 rows."""
    g = torch.Generator().manual_seed(seed)
    comps = {}
    for s in specs:
        shape = (num_layers, num_pages, page_size, s.num_heads, s.head_dim)
        n = torch.Size(shape).numel() * s.itemsize
        off = byte_offset - byte_offset % s.itemsize
        raw = torch.randint(0, 256, (n + 16,), generator=g, dtype=torch.uint8)
        comps[s.name] = raw[off:off + n].view(s.dtype).view(shape)
    return PagedKVCache(comps, stacked=True)


MIXED = [ComponentSpec("k", 1, 96, torch.bfloat16), ComponentSpec("scale", 1, 3, torch.float32),
         ComponentSpec("v", 1, 96, torch.bfloat16)]


def words_of(cache, slot, unpack):
    """The word width of every launch group the kernel plans for this pool and slot."""
    plan = plan_launch(cache, range(cache.num_layers), range(cache.num_heads),
                       slot_alignment(slot), unpack=unpack, interpret=False)
    return sorted({g.spec.word for g in plan})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["plain", "regions", "token-offset", "tokens"])
def test_pack_and_unpack_digests_agree_across_word_widths(mode, backend):
    """Sender pool 16-byte aligned (K/V in 8-byte words, fp32 scales in 4), receiver pool
    2 bytes off (K/V in 2-byte words), slot 1 byte off on one side (1-byte words): the pack
    digest, the unpack digest and `packed_digest` of the slot are one value."""
    src, dst = pool_at(MIXED, 0), pool_at(MIXED, 2, num_pages=7, page_size=2, seed=1)
    src_ids, dst_ids = torch.tensor([4, 0, 2], dtype=torch.int32), torch.arange(7)[[5, 1, 6, 0,
                                                                                     3, 2, 4]]
    pack_kw = {"plain": dict(num_tokens=12), "regions": dict(num_tokens=12, region_tokens=3),
               "token-offset": dict(num_tokens=9, token_offset=3),
               "tokens": dict(tokens=torch.tensor([11, 2, 7, 0, 5]))}[mode]
    unpack_kw = {"plain": dict(num_tokens=12), "regions": dict(num_tokens=12, region_tokens=3),
                 "token-offset": dict(num_tokens=9, token_offset=5),
                 "tokens": dict(tokens=torch.tensor([1, 13, 4, 8, 10]))}[mode]
    dev = kernel_device(backend)
    src_d, dst_d = pool_on(src, dev), pool_on(dst, dev)
    for slot_offset in (0, 1):
        nbytes = src.packed_nbytes(pack_kw.get("num_tokens") or 5)
        buf = torch.zeros(nbytes + 32, dtype=torch.uint8, device=dev)
        slot = buf[16 + slot_offset:16 + slot_offset + nbytes]
        d_pack = torch.zeros(1, dtype=torch.int64, device=dev)
        d_unpack = torch.full((1,), 7, dtype=torch.int64, device=dev)  # added to, not set
        kw = {k: on(v, dev) for k, v in pack_kw.items()}
        pack_pages(src_d, on(src_ids, dev), out=slot, digest=d_pack, backend=backend, **kw)
        kw = {k: on(v, dev) for k, v in unpack_kw.items()}
        unpack_pages(slot, dst_d, on(dst_ids, dev), digest=d_unpack, backend=backend, **kw)
        assert int(d_pack) == oracle(bytes(slot.cpu().tolist()))
        assert int(d_unpack) - 7 == int(d_pack), f"slot offset {slot_offset}"
    # the widths this test claims to mix: 8 and 4 (sender), 2 (receiver), 1 (odd slot)
    aligned = buf[16:]
    assert words_of(src, aligned, False) == [4, 8] and 2 in words_of(dst, aligned, True)
    assert words_of(src, slot, False) == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_between_pack_and_unpack_is_seen(backend):
    """A bit flipped, or two 4-byte units swapped, in the slot between pack and unpack: the
    unpack digest differs from the pack digest."""
    cache = make_cache(mha(num_heads=2, head_dim=96), num_layers=2, num_pages=6, page_size=4)
    dev = kernel_device(backend)
    src, ids = pool_on(cache, dev), torch.tensor([5, 1, 3], device=dev)
    d_pack = torch.zeros(1, dtype=torch.int64, device=dev)
    slot = pack_pages(src, ids, num_tokens=11, digest=d_pack, backend=backend)
    rng = random.Random(4)
    for trial in range(6):
        bad = slot.clone()
        if trial % 2:
            units = bad.view(torch.int32)
            a, b = rng.sample(range(units.numel()), 2)
            units[a], units[b] = units[b].clone(), units[a].clone()
        else:
            bit = rng.randrange(bad.numel() * 8)
            bad[bit // 8] ^= 1 << (bit % 8)
        d = torch.zeros(1, dtype=torch.int64, device=dev)
        unpack_pages(bad, pool_on(make_cache(mha(num_heads=2, head_dim=96), num_layers=2,
                                             num_pages=6, page_size=4), dev),
                     ids, num_tokens=11, digest=d, backend=backend)
        assert not torch.equal(d, d_pack), f"trial {trial}"


@pytest.mark.slow
def test_gpu_tiles_and_split_rows(monkeypatch):
    """The GPU's tiles (several programs per token, rows split across programs): each adds its
    share once."""
    from cpkv.kernels import paged_copy

    monkeypatch.setattr(paged_copy, "_TILE_BYTES_INTERPRET", paged_copy._TILE_BYTES)
    cache = make_cache(mha(num_heads=64, head_dim=128), num_layers=1, num_pages=5, page_size=4)
    ids = torch.tensor([2, 4, 0], device=kernel_device("triton"))
    d = torch.zeros(1, dtype=torch.int64, device=ids.device)
    slot = pack_pages(pool_on(cache, ids.device), ids, num_tokens=9, digest=d, backend="triton")
    assert int(d) == digest_of(slot)


@pytest.mark.parametrize("digest,message", [
    (torch.zeros(1, dtype=torch.int32), "got torch.int32 of shape (1,) on cpu"),
    (torch.zeros(2, dtype=torch.int64), "got torch.int64 of shape (2,) on cpu"),
    (torch.zeros(1, dtype=torch.int64, device="meta"), "on meta"),
    (0, "got int"),
])
def test_bad_digest_counters_are_refused(digest, message):
    cache = make_cache(mha(num_heads=2), num_layers=1, num_pages=4, page_size=4)
    out = torch.zeros(cache.packed_nbytes(8), dtype=torch.uint8)
    for call in (lambda: pack_pages(cache, [1, 2], out=out, digest=digest),
                 lambda: unpack_pages(out, cache, [1, 2], digest=digest, validate=False)):
        with pytest.raises(TypeError) as info:
            call()
        assert "digest: expected a one-element int64 tensor on cpu" in str(info.value)
        assert message in str(info.value)
    assert not out.any()


@pytest.mark.parametrize("buf,exc,message", [
    (torch.zeros(4, dtype=torch.int32), ValueError, "expected a contiguous 1-D uint8 tensor"),
    (torch.zeros(8, dtype=torch.uint8)[::2], ValueError, "expected a contiguous 1-D uint8"),
    ([1, 2], TypeError, "buf: expected a torch.Tensor, got list"),
])
def test_packed_digest_refuses(buf, exc, message):
    with pytest.raises(exc, match=message):
        packed_digest(buf)
    with pytest.raises(ValueError, match="offset: expected a non-negative int, got -1"):
        packed_digest(torch.zeros(4, dtype=torch.uint8), offset=-1)
