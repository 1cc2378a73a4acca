"""KVReceiver: a decode rank that receives a request's pages from every expected prefill sender.

Per request: allocate a staging slot, publish where senders may write (only the staging arena is
registered for remote writes, never the KV pool), then poll notifications without blocking.
Each notification is checked — expected sender, in order, a token range inside the request that
no earlier notification covered, and exactly the bytes that range packs to — and any violation
fails the request. Only when every expected sender has sent its last chunk are the segments
unpacked into the pool; a failure or timeout releases the slot and leaves the pool untouched.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import torch

from .._checks import check_num_tokens, check_page_ids
from ..kernels import unpack_pages
from ..staging import ArenaFullError, Slot, StagingArena
from .control import ControlPlane, ControlTimeout, ParallelRank, check_geometry
from .endpoint import Endpoint
from .engine import TransferEngine
from .status import KVStatus, StatusCell

__all__ = ["KVReceiver"]


@dataclass
class _Request:
    page_ids: torch.Tensor
    num_tokens: int
    deadline: float
    cell: StatusCell = field(default_factory=StatusCell)
    slot: Slot | None = None
    next_note: dict = field(default_factory=dict)  # sender -> next notification index
    finished: set = field(default_factory=set)  # senders whose last chunk arrived
    segments: list = field(default_factory=list)  # (t0, t1, p0, p1)
    metadata: dict = field(default_factory=dict)  # sender -> bytes


class KVReceiver(Endpoint):
    """Receives requests from the prefill senders registered under ``senders``.

    Args:
        cache: this decode rank's pool.
        control: the control plane (its namespace names this receiver).
        senders: the prefill ranks that must register and report for every request.
        engine, arena: shared ones, or None to create (and own) them.
        timeout: seconds to wait for registrations, and per request for every sender.
    """

    def __init__(self, cache, control: ControlPlane, *, senders: list[ParallelRank],
                 engine: TransferEngine | None = None, arena: StagingArena | None = None,
                 arena_bytes: int = 64 << 20, timeout: float = 30.0):
        if not senders:
            raise ValueError("senders: expected at least one prefill rank, got none")
        ids = [s.cp for s in senders]
        if len(set(ids)) != len(ids):
            raise ValueError(f"senders: expected distinct sender (cp) ids, got {ids}")
        self.senders = {s.cp: s for s in senders}
        super().__init__(cache, control, engine, arena, arena_bytes, timeout)
        control.put(control.key("recv"), {"session": self.engine.session_id,
                                          "geometry": self.geometry})
        self._requests: dict[int, _Request] = {}
        self._busy = torch.zeros(cache.num_pages, dtype=torch.bool, device=cache.device)
        self.setup_error = self._check_senders()

    def _check_senders(self) -> str | None:
        """Wait for every expected registration; a mismatch fails every request up front."""
        try:
            for s in self.senders.values():
                reg = self.control.wait_get(self.control.key("reg", s.key), self.timeout)
                check_geometry(self.geometry, reg["geometry"], f"sender {s}")
                claims = int(self.control.store.add(self.control.key("reg", s.key, "claims"), 0))
                if claims != 1:
                    raise ValueError(f"duplicate sender id: {claims} senders claim {s}")
        except (ValueError, ControlTimeout) as e:
            return str(e)
        return None

    # -- public ----------------------------------------------------------------------------

    def expect(self, request_id: int, page_ids: torch.Tensor, *,
               num_tokens: int | None = None) -> None:
        """Reserve a slot for a request and tell the senders where to write it."""
        if not isinstance(request_id, int) or request_id < 0:
            raise ValueError(f"request_id: expected a non-negative int, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already expected")
        check_page_ids(page_ids, self.cache.num_pages, self.cache.device, unique=True)
        num_tokens = check_num_tokens(num_tokens, page_ids.numel(), self.cache.page_size)
        if page_ids.numel() and bool(self._busy[page_ids.long()].any()):
            others = [r for r, q in self._requests.items() if not q.cell.done and bool(
                torch.isin(q.page_ids, page_ids).any())]
            raise ValueError(f"page_ids: some pages are still receiving request(s) {others}; "
                             f"two requests in flight must not share decode pages")
        req = _Request(page_ids, num_tokens, time.monotonic() + self.timeout)
        self._requests[request_id] = req
        self._busy[page_ids.long()] = True
        if self.setup_error:
            return self._fail(request_id, req, self.setup_error)
        try:
            req.slot = self.arena.alloc(num_tokens * self.bytes_per_token)
        except ArenaFullError as e:
            return self._fail(request_id, req, str(e))
        self.control.put(self.control.key("req", request_id, "dest"), {
            "addr": self.arena_addr + req.slot.offset, "nbytes": req.slot.nbytes,
            "num_tokens": num_tokens, "num_pages": page_ids.numel(),
            "senders": sorted(self.senders)})
        req.cell.update(KVStatus.WaitingForInput)

    def poll(self, request_id: int) -> KVStatus:
        """Advance the request (non-blocking): read notifications, unpack when complete."""
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id} is not expected here")
        if req.cell.done:
            return req.cell.status
        try:
            self._read_notes(request_id, req)
        except (ValueError, TypeError, KeyError) as e:
            return self._fail(request_id, req, f"refused notification: {e}")
        if len(req.finished) == len(self.senders):
            received = sum(t1 - t0 for t0, t1, _, _ in req.segments)
            if received != req.num_tokens:
                return self._fail(request_id, req, f"every sender finished but only {received} "
                                  f"of {req.num_tokens} tokens arrived")
            for t0, t1, p0, p1 in req.segments:
                bpt = self.bytes_per_token
                unpack_pages(req.slot.tensor[t0 * bpt:t1 * bpt], self.cache,
                             req.page_ids[p0:p1], num_tokens=t1 - t0)
            if req.slot.tensor.is_cuda:  # Success means the pool holds the bytes
                torch.cuda.current_stream(req.slot.tensor.device).synchronize()
            req.slot.release()
            self._busy[req.page_ids.long()] = False
            req.cell.update(KVStatus.Success)
            self._publish(request_id, req)
        elif time.monotonic() > req.deadline:
            missing = sorted(set(self.senders) - req.finished)
            return self._fail(request_id, req, f"timed out after {self.timeout} s waiting for "
                              f"senders {missing}")
        return req.cell.status

    def reason(self, request_id: int) -> str | None:
        return self._requests[request_id].cell.reason

    def metadata(self, request_id: int) -> bytes | None:
        """The blob a sender attached to its last chunk (lowest sender id wins)."""
        meta = self._requests[request_id].metadata
        return meta[min(meta)] if meta else None

    def forget(self, request_id: int) -> None:
        """Drop a finished request's state (its slot is already released)."""
        req = self._requests.pop(request_id, None)
        if req is not None and req.slot is not None:
            req.slot.release()

    def close(self) -> None:
        """Fail open requests, release their slots and owned engine/arena. Idempotent."""
        for rid, req in list(self._requests.items()):
            if not req.cell.done:
                self._fail(rid, req, "the receiver was closed")
        self._requests.clear()
        self._release_owned()

    # -- internals -------------------------------------------------------------------------

    def _fail(self, request_id: int, req: _Request, reason: str) -> KVStatus:
        req.cell.fail(reason)
        self._busy[req.page_ids.long()] = False
        if req.slot is not None:
            req.slot.release()
        try:
            self._publish(request_id, req)
        except Exception:
            pass  # the control plane may be gone; the local status is what counts
        return req.cell.status

    def _publish(self, request_id: int, req: _Request) -> None:
        self.control.put(self.control.key("req", request_id, "status"),
                         {"status": int(req.cell.status), "reason": req.cell.reason})

    def _read_notes(self, rid: int, req: _Request) -> None:
        for sender in self.senders:
            fail_key = self.control.key("req", rid, "fail", sender)
            if sender not in req.finished and self.control.exists(fail_key):
                raise ValueError(f"sender {sender} failed: {self.control.get(fail_key)}")
            while sender not in req.finished:
                k = req.next_note.get(sender, 0)
                key = self.control.key("req", rid, "note", sender, k)
                if not self.control.exists(key):
                    break
                self._accept(rid, req, sender, self.control.get(key))
                req.next_note[sender] = k + 1
                req.cell.update(KVStatus.Transferring)

    def _accept(self, rid: int, req: _Request, sender: int, note: dict) -> None:
        """Check one notification against the request; record its segment."""
        ps, n = self.cache.page_size, req.num_tokens
        (p0, p1), (t0, t1), nbytes = note["pages"], note["tokens"], note["nbytes"]
        for v in (p0, p1, t0, t1, nbytes):
            if not isinstance(v, int):
                raise TypeError(f"sender {sender}: non-integer field {v!r}")
        if not (0 <= p0 <= p1 <= req.page_ids.numel() and t0 == min(p0 * ps, n)
                and t1 == min(p1 * ps, n)):
            raise ValueError(f"sender {sender}: pages [{p0}, {p1}) / tokens [{t0}, {t1}) lie "
                             f"outside request {rid} ({req.page_ids.numel()} pages, {n} tokens)")
        want = (t1 - t0) * self.bytes_per_token
        if nbytes != want:
            raise ValueError(f"sender {sender}: tokens [{t0}, {t1}) pack to {want} bytes, the "
                             f"notification says {nbytes}")
        for a, b, _, _ in req.segments:
            if t0 < b and a < t1:
                raise ValueError(f"sender {sender}: tokens [{t0}, {t1}) were already received "
                                 f"([{a}, {b}))")
        if t1 > t0:
            req.segments.append((t0, t1, p0, p1))
        if note.get("metadata"):
            req.metadata[sender] = base64.b64decode(note["metadata"])
        if note["last"]:
            req.finished.add(sender)
