"""Transfer cases the mutation run (scripts/mutate.py) found untested: each test here fails on
a named mutant of scripts/mutants.py and passes on the code."""

import pytest
import torch
from kvtest import assert_cache_equals, make_cache, mha, oracle_unpack
from test_layouts import CP, run_layout
from txtest import Rogue, wait_all

from cpkv.parallel import ParallelSizes
from cpkv.transfer import KVReceiver, KVSender, KVStatus, TransferEngine, TransferError
from cpkv.transfer.cost import CostModel
from cpkv.transfer.engine import MAX_BATCH
from cpkv.transfer.mapping import map_ranks
from cpkv.transfer.protocol import Announce, End, Note

# Prefill with fewer (or differently cut) PP stages than decode: some routes' source layers
# start above 0 (3 layers: pp1 -> pp2 has the route [2, 3) -> [0, 1); pp2 -> pp3 has [1, 2) ->
# [0, 1)), so a sender that forgets the route's source-layer offset ships the wrong layers.
UNEVEN_PP = {"pp1-to-pp2": (ParallelSizes(pp=1, cp=CP), ParallelSizes(pp=2)),
             "pp2-to-pp3": (ParallelSizes(pp=2, cp=CP), ParallelSizes(pp=3))}


class CountingEngine:
    """The real Mooncake engine, counting the batches submitted and not yet waited for."""

    def __init__(self, real):
        self.real, self.in_flight, self.peak, self.submitted = real, 0, 0, 0

    def batch_transfer_async_write(self, peer, src, dst, n):
        batch_id = self.real.batch_transfer_async_write(peer, src, dst, n)
        if batch_id >= 0:
            assert len(src) <= MAX_BATCH, f"a batch of {len(src)} descriptors"
            self.submitted += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        return batch_id

    def get_batch_transfer_status(self, batch_ids):
        rc = self.real.get_batch_transfer_status(batch_ids)
        self.in_flight -= len(batch_ids)
        return rc

    def __getattr__(self, name):  # everything else: the real engine
        return getattr(self.real, name)


@pytest.mark.parametrize("mode", ["packed", "direct"])
@pytest.mark.parametrize("name", list(UNEVEN_PP))
def test_routes_with_source_layers_above_zero_bit_exact(name, mode, rig):
    p, d = UNEVEN_PP[name]
    routes = [r for rs in map_ranks(p, d, num_kv_heads=4, num_layers=3).values() for r in rs]
    assert any(r.src_layers.start > 0 for r in routes)  # the case this test is for
    run_layout("mha", 4, p, d, mode, rig)


@pytest.fixture(scope="module")
def engine():
    engine = TransferEngine("127.0.0.1")
    yield engine
    engine.close()


def test_one_batch_in_flight_over_a_long_write(engine):
    """2,500 descriptors (> 2 x MAX_BATCH): three batches, one at a time, every byte lands."""
    n, size = 2500, 8
    buf = torch.zeros(2 * n * size, dtype=torch.uint8)
    src, dst = buf[:n * size], buf[n * size:]
    src.copy_(torch.randint(0, 256, (n * size,), dtype=torch.uint8))
    addr = engine.register(buf)
    counting = CountingEngine(engine._engine)
    engine._engine = counting
    try:
        order = torch.randperm(n).tolist()
        segments = [(addr + i * size, addr + n * size + i * size, size) for i in order]
        assert engine.write(engine.session_id, segments) == n
    finally:
        engine._engine = counting.real
        engine.unregister(addr)
    assert counting.submitted == -(-n // MAX_BATCH) == 3
    assert counting.peak == 1, f"{counting.peak} batches in flight at once"
    assert counting.in_flight == 0
    assert torch.equal(dst, src)


def test_a_write_to_unregistered_memory_raises(engine):
    """A destination the peer never registered fails the write, by name, not silently."""
    src = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    elsewhere = torch.zeros(4096, dtype=torch.uint8)  # never registered
    addr = engine.register(src)
    try:
        with pytest.raises(TransferError, match="write failed with code"):
            engine.write(engine.session_id, [(addr, elsewhere.data_ptr(), 4096)])
    finally:
        engine.unregister(addr)
    assert not elsewhere.any()


def test_direct_into_a_pool_with_strided_pages_bit_exact(rig):
    """Direct runs of several pages may move as one block only where both pools' pages are
    back to back: the receiver's pool here views every other page of a larger buffer
    (d-dense). Whole pages: direct sends the last page whole, as the baseline does."""
    engine, send_arena, recv_arena = rig
    src = make_cache(mha(), num_layers=2, num_pages=8, page_size=4, seed=1)
    dst = make_cache(mha(), num_layers=2, num_pages=8, page_size=4, seed=2, strided="pages")
    s_ids, d_ids = torch.tensor([0, 1, 2, 6]), torch.tensor([3, 4, 5, 0])  # a 3-page run
    want = oracle_unpack(src, s_ids, dst, d_ids, 16, range(2), range(2), range(2), range(2))
    sender = KVSender(src, mode="direct", engine=engine, arena=send_arena, timeout=10)
    recv = KVReceiver(dst, direct=True, engine=engine, arena=recv_arena, timeout=10)
    recv.expect(1, d_ids, source="prefill", num_tokens=16)
    sender.send(1, s_ids, to=recv.address, num_tokens=16)
    assert wait_all([(recv, 1), (sender, 1)], timeout=20) == [KVStatus.Success] * 2, \
        (recv.reason(1), sender.reason(1))
    assert_cache_equals(dst, want)
    sender.close()
    recv.close()


def test_cost_model_terms_and_tie():
    """Every term of the module's two formulas counts, and a tie goes to packed."""
    m = CostModel(per_descriptor_s=2.0, wire_Bps=10.0, pack_Bps=5.0, unpack_Bps=20.0,
                  packed_fixed_s=1.0)
    assert m.direct_s(3, 100) == 3 * 2.0 + 100 / 10.0
    assert m.packed_s(100) == 1.0 + 100 / 5.0 + 100 / 10.0 + 100 / 20.0  # 36 s
    assert m.choose(12, 100) == "direct"  # 34 s < 36 s
    assert m.choose(13, 100) == "packed"  # 36 s: a tie
    assert m.choose(14, 100) == "packed"


def test_a_partial_overlap_plus_a_gap_is_refused(rig):
    """A sender that notes tokens [0, 8) then [4, 8) (last) of 12: every layer counts 12
    tokens though [8, 12) never arrived. Refused by name as an overlap (rx-overlap-exact);
    played by a hand-driven sender."""
    engine, _, recv_arena = rig
    dst = make_cache(mha(), num_layers=2, num_pages=8, page_size=4, seed=2)
    recv = KVReceiver(dst, timeout=5, engine=engine, arena=recv_arena)
    liar = Rogue(recv.address, dst)
    recv.expect(3, torch.tensor([5, 1, 6]), source="rogue", num_tokens=12)
    liar.send(Announce(3, 12, 3))
    dest = liar.recv()
    bpt = dst.packed_nbytes(1)
    for pages, tokens, nbytes, last in (((0, 2), (0, 8), 8 * bpt, False),
                                        ((1, 2), (4, 8), 4 * bpt, True)):
        liar.send(Note(3, dest.use, pages, tokens, (0, 2), nbytes, "packed", last, None, None))
    assert wait_all([(recv, 3)], timeout=10) == [KVStatus.Failed]
    assert "tokens [4, 8) were already received" in recv.reason(3), recv.reason(3)
    liar.send(End(3, dest.use, False, None))  # the rogue writes no more: slot freed
    assert recv.settle(5)
    liar.close()
    recv.close()
