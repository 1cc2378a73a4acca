"""The staging arena: one buffer allocated and registered once, carved into slots.

Every rank of a group makes the same allocation sequence, so a slot has the same offset on every
rank; that is what makes a symmetric-memory all-gather into a slot legal, and what lets a sender
write into "slot k" of a peer without asking where it is. Offsets are 4096-byte aligned (NCCL
window registration needs it) and the allocator is deterministic first-fit.

Backends (``StagingArena.capabilities()`` says which this machine has, and why not):

    "symmetric"    torch symmetric memory on CUDA over a process group (the communicator warmed
                   first; ``symmetric_backend="NCCL"`` selects NCCL window registration and
                   raises if it is not in force); a slot is gathered over that group only
    "cuda"         plain device memory
    "host"         process-private host memory
    "host-shared"  a /dev/shm mapping holding every local rank's arena; ``peer(r)`` is rank r's
                   arena, readable and writable from here (how tests prove equal offsets)

``backend="auto"`` picks the best for the device and records why it fell back in
``fallback_reason``; naming a backend never falls back silently — it raises.
"""

from __future__ import annotations

import importlib
import mmap
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ._checks import check_count
from ._closing import Closing

__all__ = ["ALIGN", "ArenaError", "ArenaFullError", "Slot", "StagingArena"]

ALIGN = 4096
BACKENDS = ("symmetric", "cuda", "host", "host-shared")


class ArenaError(RuntimeError):
    """Misuse of an arena or slot (closed arena, released slot, asymmetric layout)."""


class ArenaFullError(ArenaError):
    """No free range large enough for a slot (within the timeout, if one was given)."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(eq=False)
class Slot:
    """A range ``[offset, offset + nbytes)`` of an arena. Release it (or use ``with``)."""

    arena: StagingArena
    offset: int
    nbytes: int
    released: bool = field(default=False)

    @property
    def tensor(self) -> torch.Tensor:
        """The slot's bytes, [nbytes] uint8 (raises once released)."""
        if self.released:
            raise ArenaError(f"slot at offset {self.offset} was used after release")
        return self.arena.buffer[self.offset:self.offset + self.nbytes]

    def peer(self, rank: int) -> torch.Tensor:
        """The same slot in rank ``rank``'s arena (host-shared / symmetric backends)."""
        if self.released:
            raise ArenaError(f"slot at offset {self.offset} was used after release")
        return self.arena.peer(rank)[self.offset:self.offset + self.nbytes]

    def release(self) -> None:
        """Return the range to the arena; releasing twice is a no-op."""
        if not self.released:
            self.released = True
            self.arena._free(self)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StagingArena(Closing):
    """A registered staging buffer carved into slots.

    Args:
        nbytes: arena size (rounded up to 4096).
        backend: "auto" or one of BACKENDS.
        device: where the arena lives; default cuda if available, else cpu.
        group: process group (needed by "symmetric" and "host-shared" with several ranks, and
            by ``check_symmetric``). The constructor is then collective.
        name: "host-shared" segment name; every rank of the group must pass the same (default:
            a fresh name agreed through the group).
        symmetric_backend: torch's symmetric-memory backend to select ("NCCL", "NVSHMEM",
            "CUDA"; process-wide in torch) and verify; None keeps the one in force. After
            construction ``symmetric_backend`` names the backend in force. Never falls back.

    Example::

        arena = StagingArena(64 << 20)              # host memory on a CPU machine
        with arena.alloc(1 << 20) as slot:          # slot.tensor: [1 MiB] uint8
            pack_pages(cache, ids, out=slot.tensor)
        arena.close()
    """

    def __init__(self, nbytes: int, *, backend: str = "auto", device=None, group=None,
                 name: str | None = None, symmetric_backend: str | None = None):
        check_count(nbytes, "nbytes", 1)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.group = group
        if symmetric_backend is not None and backend not in ("symmetric", "auto"):
            raise ValueError(f"symmetric_backend: only for backend 'symmetric', got backend "
                             f"{backend!r}")
        self.symmetric_backend = symmetric_backend
        self.nbytes = _align(nbytes)
        self.backend, self.fallback_reason = self._choose(backend)
        self._cond = threading.Condition()
        self._live: dict[int, Slot] = {}  # offset -> slot
        self._closers: list[Callable[[], None]] = []  # registrations, released before memory
        self._peers: list[torch.Tensor] | None = None
        self._mmap = None
        self._symm = None
        self.closed = False
        self.buffer = self._allocate(name)

    # -- backends --------------------------------------------------------------------------

    @staticmethod
    def capabilities(device=None) -> dict[str, str | None]:
        """backend -> None if usable here, else the reason it is not."""
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        cuda_reason = None if (dev.type == "cuda" and torch.cuda.is_available()) else \
            "needs a CUDA device"
        symm_reason = cuda_reason
        if symm_reason is None:
            try:
                importlib.import_module("torch.distributed._symmetric_memory")
            except ImportError as e:
                symm_reason = f"torch symmetric memory unavailable: {e}"
        shm_reason = None if dev.type == "cpu" and os.path.isdir("/dev/shm") else \
            ("needs /dev/shm" if dev.type == "cpu" else "host-shared arenas live on the CPU")
        return {"symmetric": symm_reason, "cuda": cuda_reason,
                "host": None if dev.type == "cpu" else "host arenas live on the CPU",
                "host-shared": shm_reason}

    def _choose(self, backend: str) -> tuple[str, str | None]:
        caps = self.capabilities(self.device)
        if backend == "auto":
            order = ["symmetric", "cuda"] if self.device.type == "cuda" else ["host"]
            if self.device.type == "cuda" and self.group is None:
                caps = {**caps, "symmetric": "needs a process group"}
            reasons = []
            for b in order:
                if caps[b] is None:
                    return b, "; ".join(reasons) or None
                reasons.append(f"{b}: {caps[b]}")
            raise ArenaError(f"no staging backend for device {self.device}: "
                             f"{'; '.join(reasons)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
        if caps[backend] is not None:
            raise ArenaError(f"backend {backend!r} is not available: {caps[backend]}")
        if backend == "symmetric" and self.group is None:
            raise ValueError("backend 'symmetric': expected a process group, got None")
        return backend, None

    def _allocate(self, name: str | None) -> torch.Tensor:
        if self.backend == "host":
            return torch.empty(self.nbytes, dtype=torch.uint8)
        if self.backend == "cuda":
            return torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        if self.backend == "symmetric":
            return self._allocate_symmetric()
        return self._allocate_shared(name)

    def _allocate_symmetric(self) -> torch.Tensor:
        """torch symmetric memory over ``self.group``; raises rather than fall back.

        The communicator is warmed with a collective first (a rendezvous before the NCCL
        communicator exists can hang), the symmetric-memory backend asked for is set and then
        read back, and the rendezvous must yield a handle: anything else is an ArenaError."""
        symm = importlib.import_module("torch.distributed._symmetric_memory")
        warm = torch.zeros(1, device=self.device)
        dist.all_reduce(warm, group=self.group)  # creates the communicator
        torch.cuda.synchronize(self.device)
        get_backend = getattr(symm, "get_backend", None)
        if self.symmetric_backend is not None:
            set_backend = getattr(symm, "set_backend", None)
            if set_backend is None or get_backend is None:
                raise ArenaError(f"symmetric backend {self.symmetric_backend!r}: this torch "
                                 f"cannot select a symmetric-memory backend")
            try:
                set_backend(self.symmetric_backend)
            except (RuntimeError, ValueError) as e:
                raise ArenaError(f"symmetric backend {self.symmetric_backend!r} is not "
                                 f"available: {e}") from e
        in_force = get_backend(self.device) if get_backend is not None else None
        if self.symmetric_backend is not None and in_force != self.symmetric_backend:
            raise ArenaError(f"symmetric backend: asked for {self.symmetric_backend!r}, "
                             f"{in_force!r} is in force")
        buf = symm.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        try:
            handle = symm.rendezvous(buf, self.group)
        except RuntimeError as e:
            raise ArenaError(f"symmetric memory rendezvous failed ({in_force or 'default'} "
                             f"backend): {e}") from e
        if handle is None:
            raise ArenaError("symmetric memory rendezvous returned no handle: the buffer is "
                             "not symmetric")
        self._symm = handle
        self.symmetric_backend = in_force
        return buf

    def _allocate_shared(self, name: str | None) -> torch.Tensor:
        world = dist.get_world_size(self.group) if self.group is not None or \
            dist.is_initialized() else 1
        rank = dist.get_rank(self.group) if world > 1 else 0
        if name is None:
            name = uuid.uuid4().hex if rank == 0 else None
            if world > 1:
                box = [name]
                dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0)
                                           if self.group is not None else 0, group=self.group)
                name = box[0]
        path = f"/dev/shm/cpkv-{name}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, world * self.nbytes)
            self._mmap = mmap.mmap(fd, world * self.nbytes)
        finally:
            os.close(fd)
        if world > 1:
            dist.barrier(group=self.group)  # every rank has mapped it ...
        if rank == 0:
            try:
                os.unlink(path)  # ... so the name can go now: nothing outlives the processes
            except FileNotFoundError:
                pass
        whole = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._peers = [whole[r * self.nbytes:(r + 1) * self.nbytes] for r in range(world)]
        self.shm_path = path
        return self._peers[rank]

    def peer(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s arena as seen from this process (host-shared / symmetric)."""
        self._check_open()
        if self._peers is not None:
            return self._peers[rank]
        if self._symm is not None:
            return self._symm.get_buffer(rank, (self.nbytes,), torch.uint8)
        raise ArenaError(f"backend {self.backend!r} has no peer mapping")

    # -- slots -----------------------------------------------------------------------------

    def alloc(self, nbytes: int, *, timeout: float | None = None) -> Slot:
        """A slot of ``nbytes`` (>= 0) at the lowest free 4096-aligned offset.

        Raises ArenaFullError when no range fits; with ``timeout`` (seconds), waits that long
        for releases first.
        """
        check_count(nbytes, "nbytes")
        if nbytes > self.nbytes:
            raise ArenaFullError(f"slot of {nbytes} bytes cannot fit an arena of "
                                 f"{self.nbytes} bytes")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_open()
                offset = self._first_fit(_align(max(nbytes, 1)))
                if offset is not None:
                    slot = Slot(self, offset, nbytes)
                    self._live[offset] = slot
                    return slot
                left = None if deadline is None else deadline - time.monotonic()
                if left is None or left <= 0:
                    used = sum(_align(max(s.nbytes, 1)) for s in self._live.values())
                    raise ArenaFullError(
                        f"no free range of {nbytes} bytes: {len(self._live)} live slots hold "
                        f"{used} of {self.nbytes} bytes"
                        + (f" (waited {timeout} s)" if timeout else ""))
                self._cond.wait(left)

    def _first_fit(self, size: int) -> int | None:
        pos = 0
        for off in sorted(self._live):
            if off - pos >= size:
                return pos
            pos = off + _align(max(self._live[off].nbytes, 1))
        return pos if self.nbytes - pos >= size else None

    def _free(self, slot: Slot) -> None:
        with self._cond:
            if self._live.get(slot.offset) is slot:
                del self._live[slot.offset]
                self._cond.notify_all()

    @property
    def live_slots(self) -> list[Slot]:
        with self._cond:
            return [self._live[o] for o in sorted(self._live)]

    @property
    def bytes_in_use(self) -> int:
        with self._cond:
            return sum(s.nbytes for s in self._live.values())

    def check_symmetric(self, slots: list[Slot] | None = None) -> None:
        """Collective: every rank's (offset, nbytes) of ``slots`` (default all live) must agree.

        Raises ArenaError naming the first rank and slot that differ from rank 0's.
        """
        if self.group is None and not dist.is_initialized():
            return
        mine = [(s.offset, s.nbytes) for s in (self.live_slots if slots is None else slots)]
        everyone: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, (self.nbytes, mine), group=self.group)
        ref_size, ref = everyone[0]
        for rank, (size, theirs) in enumerate(everyone):
            if size != ref_size:
                raise ArenaError(f"arena size differs: rank 0 has {ref_size} bytes, "
                                 f"rank {rank} has {size}")
            if theirs != ref:
                for i in range(max(len(ref), len(theirs))):
                    a = ref[i] if i < len(ref) else None
                    b = theirs[i] if i < len(theirs) else None
                    if a != b:
                        raise ArenaError(f"slot {i} differs: rank 0 has (offset, nbytes) {a}, "
                                         f"rank {rank} has {b}")

    # -- registrations and teardown ---------------------------------------------------------

    def on_close(self, release: Callable[[], None]) -> None:
        """Register a release callback (e.g. a transfer-engine registration of this buffer).

        Callbacks run in reverse order at ``close()``, before the memory is freed.
        """
        self._check_open()
        self._closers.append(release)

    def _check_open(self) -> None:
        if self.closed:
            raise ArenaError("the staging arena is closed")

    def close(self) -> None:
        """Release registrations, then slots, then memory. Idempotent."""
        if self.closed:
            return
        with self._cond:
            self.closed = True
            for slot in self._live.values():
                slot.released = True
            self._live.clear()
            self._cond.notify_all()
        errors = []
        for release in reversed(self._closers):
            try:
                release()
            except Exception as e:  # keep releasing the rest; report after
                errors.append(e)
        self._closers.clear()
        self.buffer = None
        self._peers = None
        self._symm = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with the last reference
            self._mmap = None
        if errors:
            raise ArenaError(f"releasing registrations failed: {errors}") from errors[0]
