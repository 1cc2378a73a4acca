"""KVReceiver: a decode rank that receives a request's pages from every expected prefill sender.

Per request: allocate a staging slot (one region per route), publish where senders may write,
then poll notifications without blocking. In packed mode only the staging arena is registered
for remote writes, never the KV pool; direct mode (the baseline, opt-in with ``direct=True``)
registers the pool too. Each notification is checked — an expected sender, in order, a token
range inside the request that no earlier notification of its route covered, and exactly the
bytes that range moves — and any violation fails the request. Only when every expected sender
has sent its last chunk, and every route's tokens all arrived, are the packed segments unpacked
into the pool; a failure or timeout releases the slot and leaves the pool untouched (direct
writes excepted: they land in the request's pages as they come).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import torch

from .._checks import as_page_ids, check_num_tokens
from ..kernels import unpack_pages
from ..staging import ArenaFullError, Slot, StagingArena
from .control import ControlPlane, ControlTimeout, check_geometry
from .direct import direct_nbytes, pool_layout, whole_pages
from .endpoint import Endpoint
from .engine import TransferEngine
from .mapping import Route
from .status import KVStatus, StatusCell

__all__ = ["KVReceiver"]


@dataclass
class _Request:
    page_ids: torch.Tensor
    num_tokens: int
    deadline: float
    regions: dict  # route key -> byte offset in the slot
    cell: StatusCell = field(default_factory=StatusCell)
    slot: Slot | None = None
    next_note: dict = field(default_factory=dict)  # sender key -> next notification index
    finished: set = field(default_factory=set)  # senders whose last chunk arrived
    segments: dict = field(default_factory=dict)  # route key -> [(t0, t1, p0, p1, mode)]
    metadata: dict = field(default_factory=dict)  # sender key -> bytes


class KVReceiver(Endpoint):
    """Receives requests from the prefill senders of its routes.

    Args:
        cache: this decode rank's pool.
        control: the control plane (its namespace names this receiver).
        cp_size: prefill CP ranks per route; every one of them reports for every request.
        routes: what each prefill (tp, pp) source sends (`map_ranks(...)[(tp, pp)]` for this
            rank); default one route carrying every head and layer from prefill (tp 0, pp 0).
        dp: the prefill DP rank whose senders this receiver expects.
        direct: also accept direct writes into the pool (registers the pool for remote
            access; the baseline, off by default).
        engine, arena: shared ones, or None to create (and own) them.
        timeout: seconds a request may wait for every sender (registrations wait for the
            control plane's own timeout).
    """

    def __init__(self, cache, control: ControlPlane, *, cp_size: int = 1,
                 routes: list[Route] | None = None, dp: int = 0, direct: bool = False,
                 engine: TransferEngine | None = None, arena: StagingArena | None = None,
                 arena_bytes: int = 64 << 20, timeout: float = 30.0):
        routes = routes if routes is not None else [Route.whole(cache.num_heads,
                                                                cache.num_layers)]
        if not routes:
            raise ValueError("routes: expected at least one route, got none")
        if len({r.key for r in routes}) != len(routes):
            raise ValueError(f"routes: expected one route per prefill (tp, pp), got "
                             f"{[r.key for r in routes]}")
        for r in routes:
            if r.dst_heads.stop > cache.num_heads or r.dst_layers.stop > cache.num_layers or \
                    len(r.src_heads) != len(r.dst_heads) or \
                    len(r.src_layers) != len(r.dst_layers):
                raise ValueError(f"route {r.key}: heads {r.src_heads}->{r.dst_heads}, layers "
                                 f"{r.src_layers}->{r.dst_layers} do not fit this pool "
                                 f"({cache.num_heads} heads, {cache.num_layers} layers)")
        if not isinstance(cp_size, int) or cp_size < 1:
            raise ValueError(f"cp_size: expected a positive int, got {cp_size!r}")
        super().__init__(cache, control, engine, arena, arena_bytes, timeout)
        self.routes = {r.key: r for r in routes}
        self.senders = {s.key: r.key for r in routes for s in r.senders(cp_size, dp)}
        self.route_bpt = {r.key: self.route_bytes_per_token(r) for r in routes}
        self._sender_heads: dict[str, int] = {}
        info = {"session": self.engine.session_id, "geometry": self.geometry, "pool": None}
        if direct:
            self.register_pool()
            info["pool"] = pool_layout(cache)
        control.put(control.key("recv"), info)
        self.direct = direct
        self._requests: dict[int, _Request] = {}
        self._busy = torch.zeros(cache.num_pages, dtype=torch.bool, device=cache.device)
        self.setup_error = self._check_senders()

    def _check_senders(self) -> str | None:
        """Wait (the control plane's timeout) for every expected registration; a mismatch fails
        every request up front."""
        try:
            for key, route_key in self.senders.items():
                reg = self.control.wait_get(self.control.key("reg", key))
                g = reg["geometry"]
                check_geometry(self.geometry, g, f"sender {key}")
                route = self.routes[route_key]
                if route.src_heads.stop > g["num_heads"] or \
                        route.src_layers.stop > g["num_layers"]:
                    raise ValueError(f"sender {key} holds {g['num_heads']} heads and "
                                     f"{g['num_layers']} layers; route {route_key} needs heads "
                                     f"{route.src_heads} and layers {route.src_layers}")
                self._sender_heads[key] = g["num_heads"]
                claims = int(self.control.store.add(self.control.key("reg", key, "claims"), 0))
                if claims != 1:
                    raise ValueError(f"duplicate sender id: {claims} senders claim {key}")
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
        page_ids = as_page_ids(page_ids, self.cache.num_pages, self.cache.device, unique=True)
        num_tokens = check_num_tokens(num_tokens, page_ids.numel(), self.cache.page_size)
        if page_ids.numel() and bool(self._busy[page_ids.long()].any()):
            others = [r for r, q in self._requests.items() if not q.cell.done and bool(
                torch.isin(q.page_ids, page_ids).any())]
            raise ValueError(f"page_ids: some pages are still receiving request(s) {others}; "
                             f"two requests in flight must not share decode pages")
        regions, pos = {}, 0
        for key, bpt in self.route_bpt.items():
            regions[key] = pos
            pos += num_tokens * bpt
        req = _Request(page_ids, num_tokens, time.monotonic() + self.timeout, regions)
        self._requests[request_id] = req
        self._busy[page_ids.long()] = True
        if self.setup_error:
            return self._fail(request_id, req, self.setup_error)
        try:
            req.slot = self.arena.alloc(pos)
        except ArenaFullError as e:
            return self._fail(request_id, req, str(e))
        dest = {"addr": self.arena_addr + req.slot.offset, "nbytes": req.slot.nbytes,
                "regions": regions, "num_tokens": num_tokens, "num_pages": page_ids.numel()}
        if self.direct:
            dest["page_ids"] = page_ids.tolist()
        self.control.put(self.control.key("req", request_id, "dest"), dest)
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
            for key in self.routes:
                got = sum(s[1] - s[0] for s in req.segments.get(key, []))
                if got != req.num_tokens:
                    return self._fail(request_id, req, f"every sender finished but only {got} "
                                      f"of {req.num_tokens} tokens of route {key} arrived")
            self._unpack(req)
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
        """The blob a sender attached to its last chunk (lowest sender key wins)."""
        meta = self._requests[request_id].metadata
        return meta[min(meta)] if meta else None

    def forget(self, request_id: int) -> None:
        """Drop a finished request's state (its slot is already released)."""
        req = self._requests.pop(request_id, None)
        if req is not None and req.slot is not None:
            req.slot.release()

    def close(self) -> None:
        """Fail open requests, release their slots, the pool registration and owned engine and
        arena. Idempotent."""
        for rid, req in list(self._requests.items()):
            if not req.cell.done:
                self._fail(rid, req, "the receiver was closed")
        self._requests.clear()
        self._release_owned()

    # -- internals -------------------------------------------------------------------------

    def _unpack(self, req: _Request) -> None:
        base = req.slot.tensor
        for key, segments in req.segments.items():
            route, bpt, off = self.routes[key], self.route_bpt[key], req.regions[key]
            for t0, t1, p0, p1, mode in segments:
                if mode == "packed":
                    unpack_pages(base[off + t0 * bpt:off + t1 * bpt], self.cache,
                                 req.page_ids[p0:p1], num_tokens=t1 - t0,
                                 heads=route.dst_heads, layers=route.dst_layers)
        if base.is_cuda:  # Success means the pool holds the bytes
            torch.cuda.current_stream(base.device).synchronize()

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

    def _accept(self, rid: int, req: _Request, sender: str, note: dict) -> None:
        """Check one notification against the request; record its segment."""
        ps, n = self.cache.page_size, req.num_tokens
        (p0, p1), (t0, t1), nbytes = note["pages"], note["tokens"], note["nbytes"]
        mode = note.get("mode", "packed")
        for v in (p0, p1, t0, t1, nbytes):
            if not isinstance(v, int):
                raise TypeError(f"sender {sender}: non-integer field {v!r}")
        if not (0 <= p0 <= p1 <= req.page_ids.numel() and t0 == min(p0 * ps, n)
                and t1 == min(p1 * ps, n)):
            raise ValueError(f"sender {sender}: pages [{p0}, {p1}) / tokens [{t0}, {t1}) lie "
                             f"outside request {rid} ({req.page_ids.numel()} pages, {n} tokens)")
        key = self.senders[sender]
        route, bpt = self.routes[key], self.route_bpt[key]
        if mode == "packed":
            want = (t1 - t0) * bpt
        elif mode == "direct" and self.direct:
            full = whole_pages(self._sender_heads[sender], self.cache.num_heads, route)
            want = direct_nbytes(bpt, ps, range(p0, p1), range(t0, t1), full) if t1 > t0 else 0
        else:
            raise ValueError(f"sender {sender}: mode {mode!r} is not accepted here")
        if nbytes != want:
            raise ValueError(f"sender {sender}: tokens [{t0}, {t1}) {mode} move {want} bytes, "
                             f"the notification says {nbytes}")
        segments = req.segments.setdefault(key, [])
        for a, b, *_ in segments:
            if t0 < b and a < t1:
                raise ValueError(f"sender {sender}: tokens [{t0}, {t1}) were already received "
                                 f"([{a}, {b}))")
        if t1 > t0:
            segments.append((t0, t1, p0, p1, mode))
        if note.get("metadata"):
            req.metadata[sender] = base64.b64decode(note["metadata"])
        if note["last"]:
            req.finished.add(sender)
