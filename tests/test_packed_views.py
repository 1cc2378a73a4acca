"""`PackedFormat.component_view`: one strided view per component over every value and layer,
at exactly the bytes `PackedFormat.block` names (the CP gather and the torch path write and read
slots through it)."""

import pytest
import torch

from cpkv import ComponentSpec, PackedFormat

COMPONENTS = (ComponentSpec("k", 2, 8, torch.bfloat16), ComponentSpec("v", 2, 8, torch.bfloat16),
              ComponentSpec("scale", 2, 1, torch.float32))


@pytest.mark.parametrize("tokens,layers,region", [(6, 3, None), (8, 2, 4), (4, 1, 1), (0, 2, None)],
                         ids=["uncut", "two-values", "one-token-values", "empty"])
def test_views_are_the_blocks(tokens, layers, region):
    fmt = PackedFormat(tokens, layers, COMPONENTS, region_tokens=region)
    slot = torch.arange(fmt.nbytes, dtype=torch.int64).to(torch.uint8)
    for c, spec in enumerate(COMPONENTS):
        view = fmt.component_view(slot, c)
        assert view.shape == (fmt.num_regions, layers, fmt.rows_per_region, spec.num_heads,
                              spec.head_nbytes)
        for v in range(fmt.num_regions):
            for layer in range(layers):
                want = slot[fmt.block(layer, c, v).slice]
                assert torch.equal(view[v, layer].reshape(-1), want), (c, v, layer)


def test_writing_through_the_views_fills_the_slot_exactly_once():
    fmt = PackedFormat(5, 3, COMPONENTS, region_tokens=None)
    slot = torch.zeros(fmt.nbytes + 7, dtype=torch.uint8)[3:3 + fmt.nbytes]  # an offset view
    for c in range(len(COMPONENTS)):
        fmt.component_view(slot, c).add_(1)
    assert torch.equal(slot, torch.ones_like(slot))


def test_wide_words_and_what_they_must_divide():
    fmt = PackedFormat(4, 2, COMPONENTS[:2])
    slot = torch.arange(fmt.nbytes // 8, dtype=torch.int64)
    as_bytes = fmt.component_view(slot.view(torch.uint8), 1)
    words = fmt.component_view(slot, 1)  # 16-byte head rows: two int64 words
    assert torch.equal(words.contiguous().view(torch.uint8), as_bytes.contiguous())
    with pytest.raises(ValueError, match="elements of 8 bytes do not divide component 'scale'"):
        PackedFormat(3, 1, COMPONENTS).component_view(torch.zeros(30, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="expected at least 64 bytes, got 63"):
        PackedFormat(2, 1, COMPONENTS[:1]).component_view(torch.zeros(63, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="component: expected an int in"):
        fmt.component_view(slot, 2)
