"""StagingArena in one process: slots, alignment, exhaustion, release, teardown order."""

import os
import threading
import time

import pytest

from cpkv.staging import ALIGN, ArenaError, ArenaFullError, StagingArena


def test_slots_are_aligned_deterministic_and_reused():
    with StagingArena(10 * ALIGN) as arena:
        assert arena.backend == "host"
        a, b, c = arena.alloc(100), arena.alloc(ALIGN + 1), arena.alloc(0)
        assert [s.offset for s in (a, b, c)] == [0, ALIGN, 3 * ALIGN]
        b.release()
        d = arena.alloc(2 * ALIGN)  # first fit: the hole b left
        assert d.offset == ALIGN and d.tensor.numel() == 2 * ALIGN
        assert d.tensor.data_ptr() == arena.buffer.data_ptr() + ALIGN
        for s in (a, c, d):
            s.release()
        assert arena.live_slots == [] and arena.bytes_in_use == 0


def test_exhaustion_raises_with_numbers():
    with StagingArena(2 * ALIGN) as arena:
        arena.alloc(ALIGN)
        with pytest.raises(ArenaFullError, match="1 live slots hold 4096 of 8192 bytes"):
            arena.alloc(ALIGN + 1)
        with pytest.raises(ArenaFullError, match="cannot fit an arena of 8192 bytes"):
            arena.alloc(3 * ALIGN)


def test_alloc_waits_for_a_release_within_timeout():
    with StagingArena(ALIGN) as arena:
        held = arena.alloc(ALIGN)
        threading.Timer(0.2, held.release).start()
        t0 = time.monotonic()
        slot = arena.alloc(ALIGN, timeout=5)
        assert 0.1 < time.monotonic() - t0 < 5 and slot.offset == 0
        with pytest.raises(ArenaFullError, match=r"waited 0.1 s"):
            arena.alloc(1, timeout=0.1)


def test_slot_used_after_release_raises():
    with StagingArena(ALIGN) as arena:
        with arena.alloc(10) as slot:
            slot.tensor.fill_(1)
        with pytest.raises(ArenaError, match="used after release"):
            slot.tensor  # noqa: B018
        slot.release()  # twice is harmless


def test_close_releases_registrations_before_memory_and_slots():
    arena = StagingArena(ALIGN)
    slot = arena.alloc(8)
    seen = []
    arena.on_close(lambda: seen.append(("first", arena.buffer is not None)))
    arena.on_close(lambda: seen.append(("second", arena.buffer is not None)))
    arena.close()
    assert seen == [("second", True), ("first", True)]  # reverse order, memory still there
    assert slot.released and arena.buffer is None
    arena.close()  # idempotent
    with pytest.raises(ArenaError, match="closed"):
        arena.alloc(1)


def test_backend_choice_is_explicit():
    caps = StagingArena.capabilities("cpu")
    assert caps["host"] is None and caps["host-shared"] is None
    assert "CUDA" in caps["cuda"] and "CUDA" in caps["symmetric"]
    with pytest.raises(ArenaError, match="backend 'cuda' is not available: needs a CUDA device"):
        StagingArena(ALIGN, backend="cuda", device="cpu")
    with pytest.raises(ValueError, match="expected 'auto' or one of"):
        StagingArena(ALIGN, backend="nvshmem")
    with pytest.raises(ValueError, match="nbytes: expected a positive int, got 0"):
        StagingArena(0)
    with pytest.raises(ValueError, match="symmetric_backend: only for backend 'symmetric'"):
        StagingArena(ALIGN, backend="host", symmetric_backend="NCCL")


def test_host_shared_single_process_leaves_nothing_in_dev_shm():
    with StagingArena(ALIGN, backend="host-shared") as arena:
        assert not os.path.exists(arena.shm_path)  # unlinked as soon as mapped
        arena.buffer.fill_(3)
        assert int(arena.peer(0)[0]) == 3


@pytest.mark.gpu
def test_cuda_arena():
    with StagingArena(ALIGN, backend="cuda") as arena:
        assert arena.buffer.is_cuda and arena.alloc(16).tensor.is_cuda


def test_hundred_requests_leave_the_arena_empty():
    with StagingArena(8 * ALIGN) as arena:
        for i in range(100):
            with arena.alloc((i * 977) % (4 * ALIGN)) as slot:
                slot.tensor.fill_(i % 256)
        assert arena.live_slots == [] and arena.bytes_in_use == 0
