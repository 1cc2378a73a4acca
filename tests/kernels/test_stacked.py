"""The torch path's stacked fast path (one op for every layer of a component) is taken only
for layers of one allocation at equal distances, and moves exactly what the per-layer path
moves."""

import numpy as np
import pytest
import torch

import cpkv.kernels.reference as reference
from cpkv import ComponentSpec, PagedKVCache
from cpkv.kernels import pack_pages, unpack_pages

SPECS = [ComponentSpec("k", 2, 8, torch.bfloat16), ComponentSpec("v", 2, 8, torch.bfloat16)]


def pool(fill: bool) -> PagedKVCache:
    cache = PagedKVCache.empty(SPECS, num_layers=3, num_pages=24, page_size=4)
    for layers in cache.buffers.values():
        for t in layers:
            t.view(torch.int16).random_(-(1 << 15), 1 << 15) if fill else t.zero_()
    return cache


@pytest.mark.parametrize("tokens,offset", [(6, 0), (40, 0), (5, 3), (64, 0), (80, 0)])
def test_stacked_equals_per_layer(tokens, offset, monkeypatch):
    src = pool(True)
    ids = torch.randperm(24)[:-(-(tokens + offset) // 4)]
    taken = []
    real = reference._copy_stacked
    monkeypatch.setattr(reference, "_copy_stacked",
                        lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    fast = pack_pages(src, ids, num_tokens=tokens, token_offset=offset)
    fast_dst = pool(False)
    unpack_pages(fast, fast_dst, ids, num_tokens=tokens, token_offset=offset)
    assert taken == [tokens <= 16 * 4] * 2  # taken for a few pages, not for many
    monkeypatch.setattr(reference, "_stacked", lambda *a, **k: None)  # the per-layer path
    assert torch.equal(fast, pack_pages(src, ids, num_tokens=tokens, token_offset=offset))
    slow_dst = pool(False)
    unpack_pages(fast, slow_dst, ids, num_tokens=tokens, token_offset=offset)
    for a, b in zip(fast_dst.buffers.values(), slow_dst.buffers.values(), strict=True):
        for x, y in zip(a, b, strict=True):  # as bytes: random bf16 bits hold NaNs
            assert torch.equal(x.view(torch.int16), y.view(torch.int16))


def test_separate_allocations_at_equal_distances_are_not_stacked():
    """Layers that are separate tensors laid out end to end (numpy slices, another runner's
    allocator) look stacked by address but are not one storage: the per-layer path."""
    n = 8 * 4 * 2 * 8
    base = np.random.rand(6 * n).astype(np.float32)
    parts = [torch.from_numpy(base[i * n:(i + 1) * n]).view(8, 4, 2, 8) for i in range(6)]
    cache = PagedKVCache({"k": parts[:3], "v": parts[3:]})
    slot = pack_pages(cache, torch.tensor([1, 2]), num_tokens=6)
    k0 = parts[0][[1, 2]].reshape(-1, 2, 8)[:6]
    assert torch.equal(slot[:k0.numel() * 4].view(torch.float32).view(6, 2, 8), k0)
