"""The transfer engine over real Mooncake (TCP loopback): a long write goes out in batches the
transport accepts, one batch in flight at a time, and every byte lands; a write Mooncake
refuses raises by name."""

import pytest
import torch

from cpkv.transfer import TransferEngine, TransferError
from cpkv.transfer.engine import MAX_BATCH


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
