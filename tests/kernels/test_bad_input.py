"""Bad input raises ValueError/TypeError naming expected and received, and writes nothing."""

import numpy as np
import pytest
import torch
from kvtest import (
    SENTINEL,
    as_bytes,
    assert_bytes_equal,
    assert_cache_equals,
    kernel_device,
    make_cache,
    mha,
    oracle_pack,
    pool_on,
    snapshot,
)

from cpkv import ComponentSpec, PagedKVCache
from cpkv.kernels import pack_pages, reorganize_pages, unpack_pages

META = torch.device("meta")  # a second device on a CPU-only machine
P, PS, H, D = 4, 4, 2, 8  # pools next to other buffers: a bf16 layer is 512 bytes


@pytest.fixture
def src():
    return make_cache(mha(num_heads=4), num_layers=2, num_pages=6, page_size=16, seed=1)


@pytest.fixture
def dst():
    return make_cache(mha(num_heads=4), num_layers=2, num_pages=6, page_size=8, seed=2)


IDS = torch.tensor([4, 1], dtype=torch.int64)

PACK_CASES = {
    "id-too-large": (dict(page_ids=torch.tensor([1, 6])), ValueError, "[0, 6), got min 1, max 6"),
    "id-negative": (dict(page_ids=torch.tensor([-1, 2])), ValueError, "got min -1"),
    "ids-float": (dict(page_ids=torch.tensor([1.0, 2.0])), TypeError, "int32 or int64, got"),
    "ids-2d": (dict(page_ids=torch.tensor([[1, 2]])), ValueError, "1-D tensor, got shape (1, 2)"),
    "ids-list-junk": (dict(page_ids=[1, "2"]), TypeError, "expected a list of ints"),
    "ids-set": (dict(page_ids={1, 2}), TypeError, "numpy array or list of ints, got set"),
    "ids-numpy-float": (dict(page_ids=np.array([1.0, 2.0])), TypeError,
                        "expected an int32 or int64 array, got dtype float64"),
    "ids-other-device": (dict(page_ids=torch.tensor([1, 2], device=META)), ValueError,
                         "expected device cpu, got meta"),
    "too-many-tokens": (dict(num_tokens=33), ValueError, "num_tokens <= 32"),
    "negative-tokens": (dict(num_tokens=-1), ValueError, "got -1"),
    "float-tokens": (dict(num_tokens=3.0), TypeError, "num_tokens: expected int, got float"),
    "layers-outside": (dict(layers=(1, 3)), ValueError, "layers: expected a range inside [0, 2)"),
    "heads-outside": (dict(heads=(2, 5)), ValueError, "heads: expected a range inside [0, 4)"),
    "heads-reversed": (dict(heads=(3, 1)), ValueError, "got [3, 1)"),
    "heads-step": (dict(heads=range(0, 4, 2)), ValueError, "expected step 1, got 2"),
    "heads-junk": (dict(heads="all"), TypeError, "heads: expected None, (start, stop)"),
    "out-too-small": (dict(out=torch.zeros(100, dtype=torch.uint8)), ValueError,
                      "expected at least 98304 bytes, got 100"),
    "out-wrong-dtype": (dict(out=torch.zeros(98304, dtype=torch.int16)), TypeError,
                        "expected dtype torch.uint8, got torch.int16"),
    "out-other-device": (dict(out=torch.zeros(16384, dtype=torch.uint8, device=META)),
                         ValueError, "expected device cpu, got meta"),
    "out-strided": (dict(out=torch.zeros(2 * 16384, dtype=torch.uint8)[::2]), ValueError,
                    "expected a contiguous tensor"),
    "bad-backend": (dict(backend="cuda"), ValueError, "'auto', 'triton' or 'torch', got 'cuda'"),
}


@pytest.mark.parametrize("case", list(PACK_CASES))
def test_pack_rejects(case, src):
    kwargs, exc, message = PACK_CASES[case]
    kwargs = dict(kwargs)
    ids = kwargs.pop("page_ids", IDS)
    out = kwargs.get("out")
    out_before = out.clone() if out is not None and out.device.type == "cpu" else None
    before = snapshot(src)
    with pytest.raises(exc) as info:
        pack_pages(src, ids, **kwargs)
    assert message in str(info.value)
    assert_cache_equals(src, before, "source")
    if out_before is not None:
        assert torch.equal(out, out_before), "a rejected pack wrote into out"


def packed_for(src, ids=IDS, **kw):
    return pack_pages(src, ids, **kw)


UNPACK_CASES = {
    "size-mismatch": (lambda s: dict(packed=packed_for(s)[:-2]), ValueError,
                      "expected 98304 bytes for this geometry, got 98302"),
    "fewer-tokens-than-sent": (lambda s: dict(num_tokens=31), ValueError,
                               "expected 95232 bytes for this geometry, got 98304"),
    "packed-dtype": (lambda s: dict(packed=packed_for(s).view(torch.float16)), TypeError,
                     "dtype torch.float16 differs from the destination component 'k' dtype "
                     "torch.bfloat16"),
    "packed-other-device": (lambda s: dict(packed=torch.zeros(16384, dtype=torch.uint8,
                                                              device=META)),
                            ValueError, "expected device cpu, got meta"),
    "duplicate-ids": (lambda s: dict(page_ids=torch.tensor([1, 2, 3, 1])), ValueError,
                      "distinct page ids"),
    "id-too-large": (lambda s: dict(page_ids=torch.tensor([0, 1, 2, 6])), ValueError,
                     "[0, 6), got min 0, max 6"),
    "too-many-tokens": (lambda s: dict(num_tokens=40), ValueError, "num_tokens <= 32"),
    "heads-outside": (lambda s: dict(heads=(3, 5)), ValueError, "range inside [0, 4)"),
}


@pytest.mark.parametrize("case", list(UNPACK_CASES))
def test_unpack_rejects(case, src, dst):
    kwargs, exc, message = UNPACK_CASES[case]
    kwargs = kwargs(src)
    packed = kwargs.pop("packed", None)
    if packed is None:
        packed = packed_for(src)
    ids = kwargs.pop("page_ids", torch.tensor([0, 3, 5, 2]))
    before = snapshot(dst)
    with pytest.raises(exc) as info:
        unpack_pages(packed, dst, ids, **kwargs)
    assert message in str(info.value)
    assert_cache_equals(dst, before, "destination")


@pytest.mark.parametrize("field,other,message", [
    ("head_dim", mha(num_heads=4, head_dim=64), "component 'k' head_dim expected 96, got 64"),
    ("dtype", mha(num_heads=4, dtype=torch.float16),
     "component 'k' dtype expected torch.bfloat16, got torch.float16"),
    ("heads", mha(num_heads=2), "component 'k' num_heads expected 4, got 2"),
    ("names", [ComponentSpec("key", 4, 96, torch.bfloat16), ComponentSpec("v", 4, 96,
                                                                          torch.bfloat16)],
     "components expected ['k', 'v'], got ['key', 'v']"),
])
def test_unpack_rejects_other_format(field, other, message, dst):
    """The sender's format (exchanged by the control plane) must equal the destination's."""
    sender = make_cache(other, num_layers=2, num_pages=6, page_size=16)
    fmt = sender.packed_format(32)
    packed = torch.zeros(dst.packed_nbytes(32), dtype=torch.uint8)  # right size, wrong format
    before = snapshot(dst)
    with pytest.raises(ValueError, match="packed format") as info:
        unpack_pages(packed, dst, torch.tensor([0, 3, 5, 2]), format=fmt)
    assert message in str(info.value)
    assert_cache_equals(dst, before, "destination")


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch, src):
    import cpkv.kernels.paged_copy as pack_mod
    monkeypatch.setattr(pack_mod, "_INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        pack_pages(src, IDS, backend="triton")


def test_validate_false_still_works(src, dst):
    """validate=False skips the checks, not the copy."""
    ids = torch.tensor([0, 3, 5, 2])
    packed = pack_pages(src, IDS, validate=False)
    unpack_pages(packed, dst, ids, validate=False)
    assert torch.equal(as_bytes(pack_pages(dst, ids)), packed)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_page_ids_in_any_form_move_the_same_bytes(src, backend):
    """numpy, list and strided ids are taken as the contiguous tensor they show: a strided
    view must never let a kernel read the ids memory it hides (its odd elements here are out of
    range, so reading them would fault or write elsewhere)."""
    dev = kernel_device(backend)
    src = pool_on(src, dev)
    hidden = torch.tensor([4, 99, 1, -7, 5, 1 << 40], device=dev)  # [::2] shows [4, 1, 5]
    want = pack_pages(src, torch.tensor([4, 1, 5], device=dev), num_tokens=40, backend=backend)
    for ids in (hidden[::2], np.array([4, 1, 5], dtype=np.int32), [4, 1, 5], (4, 1, 5)):
        assert torch.equal(pack_pages(src, ids, num_tokens=40, backend=backend), want)
        assert torch.equal(pack_pages(src, ids, num_tokens=40, backend=backend,
                                      validate=False), want)


def test_out_must_be_one_dimensional():
    src = make_cache(mha(num_heads=2), num_layers=2, num_pages=6, page_size=4)
    nbytes = src.packed_nbytes(8)
    out = torch.full((2, nbytes), SENTINEL, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"out: expected a 1-D tensor, got shape \(2, "):
        pack_pages(src, [1, 2], out=out)
    assert bool((out == SENTINEL).all())


def pool_in(buffer: torch.Tensor, specs, num_layers, num_pages, page_size) -> PagedKVCache:
    """A pool whose layer tensors are views of ``buffer`` (uint8), back to back."""
    comps, pos = {}, 0
    for s in specs:
        shape = (num_layers, num_pages, page_size, s.num_heads, s.head_dim)
        n = torch.Size(shape).numel() * s.itemsize
        comps[s.name] = buffer[pos:pos + n].view(s.dtype).view(shape)
        pos += n
    return PagedKVCache(comps, stacked=True)


@pytest.mark.parametrize("op", ["pack-out", "unpack-packed", "reorganize-gathered"])
def test_buffers_overlapping_the_pool_are_refused(op):
    specs = mha(num_heads=2, head_dim=32)
    backing = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    cache = pool_in(backing, specs, 2, 4, 4)
    nbytes = cache.packed_nbytes(8)
    buf = backing[1000:1000 + nbytes]  # inside K's layer 0
    before, buf_before = snapshot(cache), buf.clone()
    with pytest.raises(ValueError, match="apart from the pool"):
        if op == "pack-out":
            pack_pages(cache, [1, 2], out=buf)
        elif op == "unpack-packed":
            unpack_pages(buf, cache, [1, 2])
        else:
            reorganize_pages(buf, cache, [1, 2], torch.arange(8), rows_per_rank=8)
    assert_cache_equals(cache, before, "pool")
    assert torch.equal(buf, buf_before)
    # The bytes right after the pool are fine.
    end = sum(t.numel() * t.element_size() for ts in cache.buffers.values() for t in ts)
    pack_pages(cache, [1, 2], out=backing[end:end + nbytes])


@pytest.mark.parametrize("start,what", [(-1, "the pool's last byte"),
                                        (-100, "the pool's last 100 bytes"),
                                        (-1024, "the whole pool (and more)")])
def test_out_overlapping_the_pool_is_refused(start, what):
    """An ``out`` whose bytes meet the pool's anywhere is refused and nothing is written:
    overlapping by its last byte only (c-span-extent), or partly (c-alias-partial)."""
    pool_bytes = 2 * P * PS * H * D * 2
    storage = torch.randint(0, 256, (pool_bytes + 4096,), dtype=torch.uint8)
    cache = pool_in(storage, mha(num_heads=H, head_dim=D), 1, P, PS)
    nbytes = cache.packed_nbytes(8)
    before = storage.clone()
    out = storage[pool_bytes + start:pool_bytes + start + nbytes]
    with pytest.raises(ValueError, match="expected a buffer apart from the pool"):
        pack_pages(cache, torch.tensor([1, 3]), num_tokens=8, out=out)
    assert torch.equal(storage, before), f"an out over {what} was written"
    with pytest.raises(ValueError, match="expected a buffer apart from the pool"):
        unpack_pages(out, cache, torch.tensor([1, 3]), num_tokens=8)
    assert torch.equal(storage, before)


def test_out_right_after_the_pool_is_accepted():
    """The boundary the overlap tests above pin from the other side: adjacent is not
    overlapping."""
    pool_bytes = 2 * P * PS * H * D * 2
    storage = torch.randint(0, 256, (pool_bytes + 4096,), dtype=torch.uint8)
    cache = pool_in(storage, mha(num_heads=H, head_dim=D), 1, P, PS)
    nbytes = cache.packed_nbytes(8)
    out = pack_pages(cache, torch.tensor([1, 3]), num_tokens=8,
                     out=storage[pool_bytes:pool_bytes + nbytes])
    assert_bytes_equal(out, oracle_pack(cache, torch.tensor([1, 3]), 8, range(1), range(H)),
                       "packed next to the pool")
