"""A thin, safe wrapper over the Mooncake Transfer Engine.

Callers never see Mooncake's integer return codes or raw addresses: failures raise
``TransferError(op, code, peer)``; batches are split to what the transport accepts (TCP rejects
batches above ~1,000 descriptors with -1, measured on this project's machines).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._closing import Closing

__all__ = ["MAX_BATCH", "PendingWrite", "TransferEngine", "TransferError"]

MAX_BATCH = 1024  # descriptors per batch call (4,096 returned -1 on TCP; 1,024 worked)


class TransferError(RuntimeError):
    """A transfer-engine operation failed."""

    def __init__(self, op: str, code: int, peer: str | None = None, detail: str = ""):
        self.op, self.code, self.peer = op, code, peer
        where = f" (peer {peer})" if peer else ""
        super().__init__(f"{op} failed with code {code}{where}{': ' + detail if detail else ''}")


@dataclass
class PendingWrite:
    """Writes submitted to one peer and not yet waited for."""

    peer: str
    segments: list
    batch_ids: list

    @property
    def nbytes(self) -> int:
        return sum(s[2] for s in self.segments)


class TransferEngine(Closing):
    """One Mooncake engine: P2P handshake (no metadata server), TCP here, RDMA where NICs exist.

    Args:
        hostname: the address peers reach this engine on (loopback in tests).
        protocol: "tcp" or "rdma".
        device_name: RDMA device list ("" for TCP).

    Example::

        engine = TransferEngine("127.0.0.1")
        engine.register(arena.buffer)                # once
        engine.write(peer_session, [(src_addr, dst_addr, nbytes)])
    """

    def __init__(self, hostname: str = "127.0.0.1", protocol: str = "tcp",
                 device_name: str = ""):
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol: expected 'tcp' or 'rdma', got {protocol!r}")
        try:
            from mooncake.engine import TransferEngine as _MooncakeEngine
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError("cpkv.transfer needs Mooncake: pip install 'cpkv[cpu]' (or "
                              "'cpkv[gpu]' where CUDA exists) and Debian's libibverbs1 "
                              f"librdmacm1 ({e})") from e
        self._engine = _MooncakeEngine()
        rc = self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise TransferError("initialize", rc, hostname)
        self.hostname, self.protocol = hostname, protocol
        self.session_id = f"{hostname}:{self._engine.get_rpc_port()}"
        self._registered: dict[int, list[int]] = {}  # address -> [length, references]
        self.closed = False

    def register(self, buffer: torch.Tensor) -> int:
        """Register a contiguous buffer for remote access; returns its address."""
        if not buffer.is_contiguous():
            raise ValueError("buffer: expected a contiguous tensor")
        return self.register_range(buffer.data_ptr(), buffer.numel() * buffer.element_size(),
                                   buffer.device)

    def register_range(self, addr: int, length: int, device: torch.device) -> int:
        """Register ``length`` bytes at ``addr`` (e.g. a tensor's whole storage). Registering
        again counts a reference; each `unregister` drops one, the last one unregisters."""
        self._check_open()
        if addr in self._registered:
            self._registered[addr][1] += 1
            return addr
        location = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        rc = self._engine.register_memory(addr, length, location)
        if rc != 0:
            raise TransferError("register_memory", rc, detail=f"{length} bytes at {addr:#x}")
        self._registered[addr] = [length, 1]
        return addr

    def unregister(self, addr: int) -> None:
        entry = self._registered.get(addr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._registered[addr]
            rc = self._engine.unregister_memory(addr)
            if rc != 0:
                raise TransferError("unregister_memory", rc, detail=f"address {addr:#x}")

    def register_arena(self, arena) -> int:
        """Register a StagingArena's buffer (once: again returns the same address); it is
        unregistered when the arena closes."""
        if arena.buffer.data_ptr() in self._registered:
            return arena.buffer.data_ptr()
        addr = self.register(arena.buffer)
        arena.on_close(lambda: self.unregister(addr) if not self.closed else None)
        return addr

    def write(self, peer: str, segments: list[tuple[int, int, int]]) -> int:
        """Write (src_addr, dst_addr, nbytes) segments to ``peer``; returns descriptors used.

        Split into batches of at most MAX_BATCH descriptors; a failed batch raises TransferError.
        """
        pending = self.submit(peer, segments)
        self.wait(pending)
        return len(pending.segments)

    def submit(self, peer: str, segments: list[tuple[int, int, int]]) -> PendingWrite:
        """Start writing segments to ``peer`` without waiting (overlap packing the next chunk
        with this one on the wire); `wait` for the returned handle before reusing the source."""
        self._check_open()
        segments = [s for s in segments if s[2] > 0]
        pending = PendingWrite(peer, segments, [])
        for i in range(0, len(segments), MAX_BATCH):
            if pending.batch_ids:  # more than MAX_BATCH descriptors in flight overruns the
                self.wait(pending)  # transport's queues (seen at 4,096 on TCP): one at a time
            batch = segments[i:i + MAX_BATCH]
            src, dst, n = (list(x) for x in zip(*batch, strict=True))
            batch_id = self._engine.batch_transfer_async_write(peer, src, dst, n)
            if batch_id < 0:  # not submitted: nothing of this batch is on the wire
                self._drain(pending)
                raise TransferError("write", batch_id, peer, f"submitting {len(batch)} "
                                    f"descriptors, {sum(n)} bytes")
            pending.batch_ids.append(batch_id)
        return pending

    def wait(self, *pendings: PendingWrite) -> None:
        """Block until the writes landed; raise TransferError if any failed."""
        errors = []
        for p in pendings:
            if p.batch_ids:
                rc = self._engine.get_batch_transfer_status(p.batch_ids)
                p.batch_ids = []
                if rc != 0:
                    errors.append(TransferError("write", rc, p.peer, f"{len(p.segments)} "
                                                f"descriptors, {p.nbytes} bytes"))
        if errors:
            raise errors[0]

    def _drain(self, pending: PendingWrite) -> None:
        try:
            self.wait(pending)
        except TransferError:
            pass  # the submission error is the one to report

    def _check_open(self) -> None:
        if self.closed:
            raise TransferError("use", -1, detail="the transfer engine is closed")

    def close(self) -> None:
        """Unregister every buffer. Idempotent (and a no-op on a half-built engine)."""
        if getattr(self, "closed", True):
            return
        errors = []
        for addr in list(self._registered):
            self._registered[addr][1] = 1  # closing: whatever holds a reference is done
            try:
                self.unregister(addr)
            except TransferError as e:
                errors.append(e)
        self.closed = True
        if errors:
            raise errors[0]
