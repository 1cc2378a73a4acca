"""The worker half of the cpkv connector and `from_vllm`, on pools vLLM allocates itself.

Pools come from vLLM's ``get_kv_cache_config_from_groups`` + ``allocate_kv_cache`` (the dict
``register_kv_caches`` receives), KV is written by vLLM's CPU kernel
(``ops.cpu_attn_reshape_and_cache``, the attention backend's own write), connectors are built
by ``KVConnectorFactory`` in the WORKER role, the TP group is a gloo group of one. A producer and
a consumer connector in this process move a request over Mooncake (TCP loopback) through the
same hook calls vLLM makes (bind, save_kv_layer per layer, wait_for_save, start_load_kv,
get_finished, get_block_ids_with_load_errors); every byte is compared.
"""


import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed in the vLLM lane only (make test-vllm)")

from kvtest import as_bytes  # noqa: E402
from mp import free_port, wait_for  # noqa: E402
from vllm import _custom_ops as ops  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm_engines import HEAD_DIM, KV_HEADS, write_tiny_llama  # noqa: E402
from vllm_harness import allocate, make_config  # noqa: E402

from cpkv.adapters import from_vllm  # noqa: E402
from cpkv.integrations.vllm import CpkvConnectorMetadata, RecvSpec, SendSpec  # noqa: E402
from cpkv.kernels import pack_pages  # noqa: E402

pytestmark = pytest.mark.slow

BS, LAYERS = 32, 2
KV_LAYOUTS = ["LBHNC", "LBNHC", "BLHNC", "BLNHC", "BHLNC"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("worker") / "tiny-llama")


@pytest.fixture(scope="module")
def tp_group(model):
    """vLLM's distributed state: a gloo world (and TP group) of one."""
    from vllm.distributed import parallel_state as ps
    config = make_config(model, "kv_both")
    with set_current_vllm_config(config):
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                        distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        ps.ensure_model_parallel_initialized(1, 1)
    yield
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


def cpu_write(caches: dict, slots: list[int], seed: int) -> None:
    """Write random K/V for ``slots`` into every layer with vLLM's CPU kernel, split as
    cpu_attn.py does (view + chunk)."""
    g = torch.Generator().manual_seed(seed)
    for t in caches.values():
        blocks, heads, bs, _ = t.shape
        key_cache, value_cache = t.view(blocks, heads, 2 * bs, -1).chunk(2, dim=2)
        k, v = (torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
                for _ in "kv")
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache,
                                       torch.tensor(slots, dtype=torch.int64), "vec")


def blocks_bytes(caches: dict, blocks: list[int]) -> list[torch.Tensor]:
    return [as_bytes(t[blocks].contiguous()) for t in caches.values()]


def connector(model, role: str, port: int = 0, block_size: int = BS, **extra):
    config = make_config(model, role, block_size=block_size, kv_port=port,
                         engine_id=role.replace("kv_", ""), extra={"cpkv_timeout": 10, **extra})
    kv_cache_config, caches = allocate(config, LAYERS)
    with set_current_vllm_config(config):
        conn = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER,
                                                   kv_cache_config)
        conn.register_kv_caches(caches)
    return conn, caches


def run_step(conn, meta, *, save=False):
    """One engine step's worker hooks, in vLLM's order."""
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    if save:
        for name in conn._layer_index:
            conn.wait_for_layer_load(name)
            conn.save_kv_layer(name, None, None)
    conn.wait_for_save()
    conn.clear_connector_metadata()


def test_cpu_pool_views_are_whole_blocks(model):
    """from_vllm on vLLM's CPU allocation, bytes written by vLLM's CPU kernel: a block's K
    plane moves whole; the kernel's column-major K is no per-token row."""
    _, caches = allocate(make_config(model, "kv_both", block_size=BS), LAYERS)
    cpu_write(caches, [3 * BS + 1, 3 * BS + 5, 7 * BS], seed=1)
    cache = from_vllm(caches, backend="cpu", vllm_version="0.32.0", cpu_isa="vec")
    got = pack_pages(cache, torch.tensor([3, 7]), num_tokens=2)
    want = torch.cat([as_bytes(plane[b]).reshape(-1) for t in caches.values()
                      for plane in t.view(t.shape[0], KV_HEADS, 2 * BS, -1).chunk(2, dim=2)
                      for b in (3, 7)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", KV_LAYOUTS)
def test_gpu_layouts_from_vllm_allocation(model, layout):
    """The fused per-head K|V of vLLM's GPU backends, in each KVCacheLayout vLLM allocates:
    cpkv's pack equals flash_attn's own reading (kv_cache.transpose(1, 2).split(D, -1))."""
    _, caches = allocate(make_config(model, "kv_both", block_size=BS, layout=layout), LAYERS)
    g = torch.Generator().manual_seed(2)
    for t in caches.values():
        as_bytes(t).copy_(torch.randint(0, 256, as_bytes(t).shape, generator=g,
                                        dtype=torch.uint8))
    cache = from_vllm(caches, backend="flash_attn", vllm_version="0.32.0")
    ids, n = [5, 2], BS + 3
    got = pack_pages(cache, torch.tensor(ids), num_tokens=n)
    parts = []
    for t in caches.values():
        for half in t.transpose(1, 2).split(HEAD_DIM, dim=-1):  # [blocks, bs, heads, D]
            rows = [half[ids[i // BS], i % BS] for i in range(n)]
            parts.append(as_bytes(torch.stack(rows)).reshape(-1))
    assert torch.equal(got, torch.cat(parts))


def finish(producer, consumer, sends=("p",), recvs=("d",), timeout=60):
    """Step both workers' get_finished until the requests ended on both (the producer's
    ``sends`` finished in vLLM); (received, sent, the consumer's load errors)."""
    recvd, sent = set(), set()

    def ended():
        recvd.update(consumer.get_finished(set())[1])
        sent.update(producer.get_finished(set(sends))[0])
        return recvd == set(recvs) and sent == set(sends)

    wait_for(ended, timeout, interval=0.01, fail=False)  # the caller asserts what ended
    return recvd, sent, consumer.get_block_ids_with_load_errors()


@pytest.mark.parametrize("prefix", [0, BS], ids=["no-prefix", "one-block-cached"])
def test_worker_hooks_move_a_request_bit_exact(model, tp_group, prefix):
    """Producer and consumer workers, hooks called as vLLM calls them: the consumer's blocks
    end bit-exact equal to the producer's, layer by layer, and nothing else is written (with
    a local prefix hit, not the cached block either)."""
    port = free_port()
    consumer, dst = connector(model, "kv_consumer", port)
    producer, src = connector(model, "kv_producer")
    sent = []
    send_layers = producer.transport.send_layers
    producer.transport.send_layers = lambda *a, **k: (sent.append(a[5]), send_layers(*a, **k))
    try:
        src_blocks, dst_blocks, n = [4, 9, 2], [11, 3, 6], 2 * BS + 7
        cpu_write(src, [b * BS + s for b in src_blocks for s in range(BS)], seed=3)
        cpu_write(dst, list(range(0, 16 * BS)), seed=4)  # poison
        before = blocks_bytes(dst, list(range(16)))
        run_step(consumer, CpkvConnectorMetadata(recvs=[
            RecvSpec("d", "t-77", "producer", dst_blocks, n, prefix)]))
        run_step(producer, CpkvConnectorMetadata(sends=[
            SendSpec("p", "t-77", [f"127.0.0.1:{port}"], src_blocks, n)]), save=True)
        assert sent == [1, 2]  # one call per layer as the forward saves it
        assert finish(producer, consumer) == ({"d"}, {"p"}, set())
        moved = prefix // BS
        assert all(torch.equal(a, b) for a, b in zip(blocks_bytes(dst, dst_blocks[moved:]),
                                                     blocks_bytes(src, src_blocks[moved:]),
                                                     strict=True))
        others = [b for b in range(16) if b not in dst_blocks[moved:]]
        assert all(torch.equal(a[others], b[others])
                   for a, b in zip(blocks_bytes(dst, list(range(16))), before, strict=True))
    finally:
        producer.shutdown()
        consumer.shutdown()


def test_requests_sharing_a_cached_prefix_are_received_together(model, tp_group):
    """Three requests in flight share a cached prefix block (prefix caching): all are
    expected at once (the receiver never writes, nor counts busy, a prefix page); two land
    bit-exact and the shared block is never written; the third, aborted while it loads, is
    reported at once without load errors."""
    port = free_port()
    consumer, dst = connector(model, "kv_consumer", port)
    producer, src = connector(model, "kv_producer")
    try:
        n, to = 2 * BS + 3, [f"127.0.0.1:{port}"]
        cpu_write(src, list(range(16 * BS)), seed=6)
        cpu_write(dst, list(range(16 * BS)), seed=7)  # poison
        before = blocks_bytes(dst, list(range(16)))
        run_step(consumer, CpkvConnectorMetadata(recvs=[
            RecvSpec(f"d{i}", f"t-{i}", "producer", [5, *blocks], n, prefix=BS)
            for i, blocks in ((1, [6, 7]), (2, [8, 9]), (3, [10, 11]))]))
        run_step(producer, CpkvConnectorMetadata(sends=[
            SendSpec("p1", "t-1", to, [1, 2, 3], n), SendSpec("p2", "t-2", to, [4, 12, 13], n)]),
            save=True)
        assert consumer.get_finished({"d3"}) == (set(), {"d3"})  # vLLM aborted it
        recvd, sent, errors = set(), set(), set()

        def ended():
            run_step(consumer, CpkvConnectorMetadata())  # the engine keeps stepping
            recvd.update(consumer.get_finished(set())[1])
            sent.update(producer.get_finished({"p1", "p2"})[0])
            errors.update(consumer.get_block_ids_with_load_errors())
            return recvd == {"d1", "d2"} and sent == {"p1", "p2"}

        wait_for(ended, 60, interval=0.01, fail=False)
        assert (recvd, sent, errors) == ({"d1", "d2"}, {"p1", "p2"}, set())
        assert all(torch.equal(a, b) for a, b in zip(blocks_bytes(dst, [6, 7, 8, 9]),
                                                     blocks_bytes(src, [2, 3, 12, 13]),
                                                     strict=True))
        others = [b for b in range(16) if b not in (6, 7, 8, 9)]
        assert all(torch.equal(a[others], b[others])
                   for a, b in zip(blocks_bytes(dst, list(range(16))), before, strict=True))
    finally:
        producer.shutdown()
        consumer.shutdown()


def test_cpu_pools_of_other_block_sizes_are_refused(model, tp_group, caplog):
    """vLLM's CPU blocks move whole (K is column-major inside a block): a prefill worker with
    blocks of 32 cannot feed a decode worker with blocks of 64. The receiver refuses the
    sender (the packed formats differ), the send fails at once with that reason, the receive
    at its timeout with load errors on its blocks, and no byte of the decode pool changes."""
    port = free_port()
    consumer, dst = connector(model, "kv_consumer", port, block_size=2 * BS, cpkv_timeout=2)
    producer, _ = connector(model, "kv_producer")
    try:
        before = [as_bytes(t).clone() for t in dst.values()]
        run_step(consumer, CpkvConnectorMetadata(recvs=[RecvSpec("d", 8, "producer", [1, 2],
                                                                 3 * BS)]))
        run_step(producer, CpkvConnectorMetadata(sends=[
            SendSpec("p", 8, [f"127.0.0.1:{port}"], [1, 2, 3], 3 * BS)]), save=True)
        assert finish(producer, consumer) == ({"d"}, {"p"}, {1, 2})
        assert "refused this sender" in caplog.text and "head_dim expected 2048, got 1024" \
            in caplog.text
        assert all(torch.equal(as_bytes(t), b) for t, b in zip(dst.values(), before,
                                                              strict=True))
    finally:
        producer.shutdown()
        consumer.shutdown()


def test_a_failed_receive_reports_its_blocks_once(model, tp_group):
    """Nobody sends: after cpkv_timeout the requests are reported received, with every block
    they were to load as a load error (vLLM then recomputes or fails them), once; the blocks
    of a local prefix hit (shared with other requests) are not among them."""
    consumer, _ = connector(model, "kv_consumer", free_port(), cpkv_timeout=1)
    try:
        run_step(consumer, CpkvConnectorMetadata(recvs=[
            RecvSpec("d", 5, "producer", [1, 2], BS + 1),
            RecvSpec("e", 6, "producer", [3, 4, 5], 2 * BS + 1, prefix=BS)]))
        recvd = set()
        wait_for(lambda: recvd.update(consumer.get_finished(set())[1]) or recvd == {"d", "e"},
                 30, interval=0.05, fail=False)
        assert recvd == {"d", "e"}
        assert consumer.get_block_ids_with_load_errors() == {1, 2, 4, 5}
        assert consumer.get_block_ids_with_load_errors() == set()
    finally:
        consumer.shutdown()


def test_a_receive_aborted_by_vllm_ends_at_once_without_load_errors(model, tp_group):
    """vLLM finished the request while its KV was on the way (an abort): the receive is
    dropped (nothing more lands in its blocks) and reported at once, so vLLM frees them."""
    consumer, _ = connector(model, "kv_consumer", free_port())
    try:
        run_step(consumer, CpkvConnectorMetadata(recvs=[RecvSpec("d", 6, "producer", [1, 2],
                                                                 BS + 1)]))
        assert consumer.get_finished(set()) == (set(), set())
        assert consumer.get_finished({"d"}) == (set(), {"d"})
        assert consumer.get_block_ids_with_load_errors() == set()
        assert consumer.get_finished(set()) == (set(), set())
    finally:
        consumer.shutdown()
