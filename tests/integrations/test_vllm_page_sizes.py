"""Page-size conversion between a prefill and a decode worker, on pools vLLM's GPU backends
allocate (the fused per-head K|V of flash_attn / flashinfer / triton_attn, 0.26+), without an
engine: tensors from vLLM's own ``allocate_kv_cache`` in a GPU ``KVCacheLayout`` (on CPU
memory: the bytes and strides are the GPU ones), viewed by ``from_vllm``, vLLM blocks mapped to
pages by the connector's `block_pages`, moved by the connector's `KVTransport` (a real
`KVSender` and `KVReceiver` over Mooncake TCP loopback), layer by layer. The oracle reads both
pools the way flash_attn does (``kv_cache.transpose(1, 2).split(head_size, -1)``): every token
past the decode side's cached prefix lands bit-exact at its place in the decode blocks; every
other byte of the decode pool (poisoned) is unchanged.

(vLLM's CPU backend cannot do this: its blocks are multiples of 32 tokens and move whole, see
docs/vllm.md; tests/integrations/test_vllm_worker.py shows such a pair is refused.)
"""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed in the vLLM lane only (make test-vllm)")

from kvtest import SENTINEL, as_bytes, assert_bytes_equal  # noqa: E402
from mp import wait_for  # noqa: E402
from vllm_engines import HEAD_DIM, write_tiny_llama  # noqa: E402
from vllm_harness import allocate, make_config  # noqa: E402

from cpkv.adapters import from_vllm  # noqa: E402
from cpkv.integrations.transport import KVTransport, TransferState  # noqa: E402
from cpkv.integrations.vllm import block_pages  # noqa: E402

pytestmark = pytest.mark.slow

LAYERS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("pages") / "tiny-llama")


def pool(model, block_size, layout, kernel_block_size=None):
    """vLLM's allocation of a GPU-backend pool: (the per-layer tensors, the cpkv view)."""
    config = make_config(model, "kv_both", block_size=block_size, layout=layout)
    _, caches = allocate(config, LAYERS, kernel_block_size=kernel_block_size)
    return caches, from_vllm(caches, backend="flash_attn", vllm_version="0.32.0")


def rows(caches, blocks, block_size, token):
    """Token ``token``'s K and V of every layer, read as flash_attn reads the cache: vLLM
    block ``blocks[token // block_size]``, in the kernel's blocks the tensors are cut in."""
    kernel = next(iter(caches.values())).shape[2]
    offset = token % block_size
    page = blocks[token // block_size] * (block_size // kernel) + offset // kernel
    return [half[page, offset % kernel] for t in caches.values()
            for half in t.transpose(1, 2).split(HEAD_DIM, dim=-1)]


# (block size, kernel block size, KVCacheLayout) of the prefill and the decode pool, decode prefix
CASES = {
    "16-to-32": ((16, None, "LBHNC"), (32, None, "LBNHC"), 0),
    "32-to-16": ((32, None, "BLHNC"), (16, None, "LBHNC"), 0),
    # the decode side holds its first block of 16: the prefill's first page of 32 is sent
    # from its middle
    "32-to-16-cached-block": ((32, None, "LBHNC"), (16, None, "BLNHC"), 16),
    # vLLM blocks of 32 in attention-kernel blocks of 16 on the decode side
    "16-to-32-in-kernel-16": ((16, None, "LBNHC"), (32, 16, "LBHNC"), 32),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_page_sizes_convert_bit_exact(model, case):
    (sbs, skb, slay), (dbs, dkb, dlay), prefix = case
    src_caches, src = pool(model, sbs, slay, skb)
    dst_caches, dst = pool(model, dbs, dlay, dkb)
    g = torch.Generator().manual_seed(5)
    for t in src_caches.values():
        as_bytes(t).copy_(torch.randint(0, 256, as_bytes(t).shape, generator=g,
                                        dtype=torch.uint8))
    for t in dst_caches.values():
        as_bytes(t).fill_(SENTINEL)
    want = {name: t.clone() for name, t in dst_caches.items()}
    n = 2 * 32 + 7  # a last page partly filled on both sides
    src_blocks = [9, 2, 7, 4, 11][:-(-n // sbs)]
    dst_blocks = [3, 8, 1, 12, 5][:-(-n // dbs)]
    s_ids, s_n, _ = block_pages(src_blocks, n, block_size=sbs, page_size=src.page_size,
                                whole_blocks=False)
    d_ids, d_n, d_prefix = block_pages(dst_blocks, n, block_size=dbs, page_size=dst.page_size,
                                       whole_blocks=False, prefix=prefix)
    assert (s_n, d_n, d_prefix) == (n, n, prefix)
    for i in range(prefix, n):
        for got, new in zip(rows(want, dst_blocks, dbs, i),
                            rows(src_caches, src_blocks, sbs, i), strict=True):
            got.copy_(new)
    consumer = KVTransport(dst, instance="decode-x", serve=0, timeout=30)
    producer = KVTransport(src, instance="prefill-x", send=True, timeout=30)
    try:
        consumer.expect("d", "t-1", "prefill-x", d_ids, n, d_prefix)
        for upto in range(1, LAYERS + 1):  # layer by layer, as the forward saves them
            producer.send_layers("p", "t-1", [consumer.address], s_ids, n, upto)
        wait_for(lambda: TransferState.PENDING not in (consumer.state("d"), producer.state("p")),
                 60, interval=0.01, fail=False)  # asserted below, with the reasons
        assert (consumer.state("d"), producer.state("p")) == (TransferState.DONE,) * 2, \
            (consumer.reason("d"), producer.reason("p"))
        assert consumer.layers_ready("d") == LAYERS
        for name, t in dst_caches.items():
            assert_bytes_equal(t, want[name], f"decode pool {name}")
    finally:
        producer.close()
        consumer.close()
