"""KVReceiver: a decode rank that receives a request's pages from every expected prefill sender.

Per request (one *use*: one `expect` in this receiver's incarnation): allocate a staging slot (one
region per route), publish where senders may write, then poll notifications without blocking. In
packed mode only the staging arena is registered for remote writes, never the KV pool; direct
mode (the baseline, opt-in with ``direct=True``) registers the pool too. Each notification names
a segment (pages, tokens and route-local layers of one route) and is checked — an expected
sender, in order, a token x layer range inside the request that no earlier notification of its
route covered, exactly the bytes that range moves, and (with ``checksum=True``) the CRC32C of the
bytes that landed — and any violation fails the request.

Streaming: each checked packed segment is unpacked at once into the request's own (reserved)
pages, so layers arrive in the pool while the senders' prefill still computes later ones;
`layers_ready` says how many leading layers of the pool are complete. Success only when every
expected sender has sent its last call and every layer of every route holds every token. A
failure or timeout leaves the request's pages holding undefined bytes (some layers may have been
unpacked); no page outside the request is ever written.

Fencing: when a request ends, the receiver publishes its verdict and deletes its destination. A
failed request's slot (and, in direct mode, its pages) stays *quarantined* until every sender
that might still be writing has acknowledged, or ``grace`` seconds have passed, so a late writer
lands in memory no other request uses; a request's keys are deleted once every sender has read
the verdict (or after the grace period). Nothing a peer or the network does makes `poll` raise.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field

import torch

from .._checks import as_page_ids, check_num_tokens
from ..kernels import unpack_pages
from ..staging import Slot, StagingArena
from .control import ControlError, ControlPlane, check_geometry
from .direct import direct_nbytes, pool_addresses, whole_pages
from .endpoint import Endpoint, check_ready
from .engine import TransferEngine
from .mapping import Route
from .sender import checksum as crc32c_of
from .status import KVStatus, StatusCell

__all__ = ["KVReceiver"]

SWEEP_INTERVAL = 0.005  # seconds between looks at ended requests' acknowledgements
REGISTRATION_INTERVAL = 0.25  # seconds between re-reads of the senders' registrations
CLOSE_WAIT = 2.0  # seconds `close` waits for senders to acknowledge verdicts


@dataclass
class _Request:
    rid: int
    page_ids: torch.Tensor
    host_ids: torch.Tensor  # the same ids on the host (busy-page bookkeeping, no device sync)
    num_tokens: int
    deadline: float
    regions: dict  # route key -> byte offset in the slot
    prefix: str  # the use's key prefix
    ready: object = None  # the runner's CUDA event (unpack is ordered after it)
    cell: StatusCell = field(default_factory=StatusCell)
    slot: Slot | None = None
    published: bool = False
    unpacked: object = None  # CUDA event recorded after the last unpack
    consumed: dict = field(default_factory=dict)  # sender key -> notification lines read
    finished: set = field(default_factory=set)  # senders whose last chunk arrived
    ended: set = field(default_factory=set)  # senders that said they write no more
    segments: dict = field(default_factory=dict)  # route key -> [(t0, t1, l0, l1)]
    landed: dict = field(default_factory=dict)  # route key -> [tokens in the pool per layer]
    inflight: list = field(default_factory=list)  # CUDA: (event, route key, l0, l1, tokens)
    metadata: dict = field(default_factory=dict)  # sender key -> bytes


@dataclass
class _Ended:
    """A request that ended here while senders may still write (slot held) or have yet to read
    the verdict (keys kept)."""

    prefix: str
    dest_key: str
    slot: Slot | None
    host_ids: torch.Tensor | None  # direct mode: pages kept busy with the slot
    writers: set
    readers: set
    consumed: dict
    deadline: float


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        timeout: seconds a request may wait for every sender.
        checksum: ask senders for a CRC32C of every packed segment and verify it before
            unpacking it (costs a pass over the bytes on both sides; needs ``crc32c``).
        grace: seconds a failed request's slot stays quarantined, and an ended request's
            keys are kept, while a sender has not acknowledged (default ``timeout``). Keep it
            at least the senders' timeout: a sender that is late then learns the verdict at
            once instead of waiting out its own timeout for a destination that is gone.

    The constructor does not wait for senders: it publishes this receiver and returns.
    Senders may register before or after; `ready` / `wait_ready` say when all have, and
    `setup_error` names a registered sender that does not fit. Use as a context manager or
    call `close`.
    """

    def __init__(self, cache, control: ControlPlane, *, cp_size: int = 1,
                 routes: list[Route] | None = None, dp: int = 0, direct: bool = False,
                 engine: TransferEngine | None = None, arena: StagingArena | None = None,
                 arena_bytes: int = 64 << 20, timeout: float = 30.0, checksum: bool = False,
                 grace: float | None = None):
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
        if not _int(cp_size) or cp_size < 1:
            raise ValueError(f"cp_size: expected a positive int, got {cp_size!r}")
        for name, flag in (("direct", direct), ("checksum", checksum)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected bool, got {type(flag).__name__}")
        if grace is not None and (not isinstance(grace, (int, float)) or grace < 0):
            raise ValueError(f"grace: expected a non-negative number of seconds, got {grace!r}")
        super().__init__(cache, control, engine, arena, arena_bytes, timeout)
        try:
            self.routes = {r.key: r for r in routes}
            self.senders = {s.key: r.key for r in routes for s in r.senders(cp_size, dp)}
            self.route_bpt = {r.key: self.route_bytes_per_token(r) for r in routes}
            self.direct, self.checksum = direct, checksum
            self.grace = self.timeout if grace is None else float(grace)
            self.incarnation = uuid.uuid4().hex[:16]
            info = {"inc": self.incarnation, "session": self.engine.session_id,
                    "geometry": self.geometry, "pool": None, "checksum": checksum}
            if direct:
                self.register_pool()
                info["pool"] = pool_addresses(cache)
            control.put(control.key("recv"), info)
        except BaseException:
            self._release_owned()
            raise
        self._requests: dict[int, _Request] = {}
        self._ended: list[_Ended] = []
        self._next_use = 0
        self._busy = torch.zeros(cache.num_pages, dtype=torch.bool)  # host bookkeeping
        self._registrations: dict[str, tuple[str, str | None, int] | None] = {
            k: None for k in self.senders}  # key -> (incarnation, error, num_heads)
        self._regs_read_at = self._swept_at = 0.0
        self.trace: list | None = None  # set to a list to record (what, rid, l0, l1, t0, t1)
        self._refresh_senders(force=True)

    # -- senders ---------------------------------------------------------------------------

    def _refresh_senders(self, force: bool = False) -> None:
        """Re-read the registrations (throttled): new and restarted senders are checked."""
        now = time.monotonic()
        if not force and now - self._regs_read_at < REGISTRATION_INTERVAL:
            return
        self._regs_read_at = now
        for key, route_key in self.senders.items():
            try:
                reg = self.control.get_or_none(self.control.key("reg", key))
            except Exception as e:
                self._registrations[key] = ("?", f"sender {key}: {e}", 0)
                continue
            if reg is None:
                self._registrations[key] = None
                continue
            try:
                if not isinstance(reg, dict) or not isinstance(reg.get("inc"), str):
                    raise ControlError(f"sender {key}: malformed registration")
                seen = self._registrations.get(key)
                if seen is not None and seen[0] == reg["inc"]:
                    continue
                g = reg.get("geometry")
                check_geometry(self.geometry, g, f"sender {key}")
                route = self.routes[route_key]
                if not _int(g.get("num_heads")) or not _int(g.get("num_layers")):
                    raise ControlError(f"sender {key}: malformed geometry")
                if route.src_heads.stop > g["num_heads"] or \
                        route.src_layers.stop > g["num_layers"]:
                    raise ValueError(f"sender {key} holds {g['num_heads']} heads and "
                                     f"{g['num_layers']} layers; route {route_key} needs heads "
                                     f"{route.src_heads} and layers {route.src_layers}")
                self._registrations[key] = (reg["inc"], None, g["num_heads"])
            except Exception as e:
                inc = reg.get("inc") if isinstance(reg, dict) else "?"
                self._registrations[key] = (str(inc), str(e), 0)

    def _registration(self, sender: str) -> tuple[str, str | None, int]:
        """The sender's checked registration, re-read now if not yet seen: a note is never
        judged against a registration this receiver has not read (registrations are otherwise
        re-read only every REGISTRATION_INTERVAL)."""
        reg = self._registrations.get(sender)
        if reg is None or reg[1]:
            self._refresh_senders(force=True)
            reg = self._registrations.get(sender)
        if reg is None:
            raise ControlError(f"sender {sender}: notified before it registered")
        if reg[1]:
            raise ValueError(reg[1])
        return reg

    @property
    def setup_error(self) -> str | None:
        """Why a registered sender cannot serve this receiver (geometry, route), or None.
        A sender that has not registered yet is not an error: see `ready`."""
        self._refresh_senders()
        errors = [r[1] for r in self._registrations.values() if r is not None and r[1]]
        return errors[0] if errors else None

    @property
    def ready(self) -> bool:
        """Every expected sender has registered and fits."""
        self._refresh_senders()
        return all(r is not None and r[1] is None for r in self._registrations.values())

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait (default the request timeout) until `ready`; False on a setup error or when
        the time is up."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._refresh_senders(force=True)
            if self.setup_error:
                return False
            if self.ready:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    # -- public ----------------------------------------------------------------------------

    def expect(self, request_id: int, page_ids: torch.Tensor, *,
               num_tokens: int | None = None, ready=None) -> None:
        """Reserve a slot for a request and tell the senders where to write it.

        ``ready``: the runner's ``torch.cuda.Stream`` or ``torch.cuda.Event`` after which the
        request's pages may be written (the unpack is ordered after it; in direct mode this
        call waits for it before publishing). Checked here; a problem of the control plane or
        the arena fails the request (see `poll`) instead of raising.
        """
        if not _int(request_id) or request_id < 0:
            raise ValueError(f"request_id: expected a non-negative int, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already expected (forget it first)")
        page_ids = as_page_ids(page_ids, self.cache.num_pages, self.cache.device, unique=True)
        num_tokens = check_num_tokens(num_tokens, page_ids.numel(), self.cache.page_size)
        event = check_ready(ready, self.cache.device)
        host_ids = page_ids.cpu().long()  # the entry's one read of the ids
        self._sweep(force=True)
        if host_ids.numel() and bool(self._busy[host_ids].any()):
            others = [r for r, q in self._requests.items() if not q.cell.done and bool(
                torch.isin(q.host_ids, host_ids).any())]
            raise ValueError(f"page_ids: some pages are still receiving request(s) {others} "
                             f"(or a failed one's late writers); two requests in flight must "
                             f"not share decode pages")
        regions, pos = {}, 0
        for key, bpt in self.route_bpt.items():
            regions[key] = pos
            pos += num_tokens * bpt
        use = self._next_use
        self._next_use += 1
        req = _Request(request_id, page_ids, host_ids, num_tokens,
                       time.monotonic() + self.timeout, regions,
                       self.control.key(self.incarnation, "use", use), event)
        self._requests[request_id] = req
        self._busy[host_ids] = True
        try:
            self._refresh_senders()
            error = self.setup_error
            if error:
                self._finish(request_id, req, error)
                return
            req.slot = self.arena.alloc(pos)
            dest = {"use": use, "addr": self.arena_addr + req.slot.offset,
                    "nbytes": req.slot.nbytes, "regions": regions, "num_tokens": num_tokens,
                    "num_pages": page_ids.numel()}
            if self.direct:
                dest["page_ids"] = host_ids.tolist()
                if event is not None:
                    event.synchronize()  # senders write the pages directly
            req.published = True  # from here on a sender may have read it
            self.control.put(self._dest_key(request_id), dest)
        except Exception as e:
            self._finish(request_id, req, f"{type(e).__name__}: {e}")
            return
        req.cell.update(KVStatus.WaitingForInput)

    def poll(self, request_id: int) -> KVStatus:
        """Advance the request (non-blocking): read notifications, unpack when complete.

        Never raises for anything a peer or the network did: that fails the request with a
        reason. The deadline is checked first. (An unknown request id raises KeyError.)"""
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id} is not expected here")
        if req.cell.done:
            return req.cell.status
        try:
            self._sweep()
            if req.unpacked is not None:  # CUDA: Success once the unpack has run
                if req.unpacked.query():
                    self._finish(request_id, req)
                return req.cell.status
            if time.monotonic() > req.deadline:
                missing = sorted(set(self.senders) - req.finished)
                return self._finish(request_id, req, f"timed out after {self.timeout} s "
                                    f"waiting for senders {missing}")
            self._read_notes(request_id, req)
            if len(req.finished) == len(self.senders):
                self._complete(request_id, req)
        except Exception as e:
            return self._finish(request_id, req, f"refused notification: "
                                f"{type(e).__name__}: {e}")
        return req.cell.status

    def reason(self, request_id: int) -> str | None:
        return self._requests[request_id].cell.reason

    def metadata(self, request_id: int) -> bytes | None:
        """The blob a sender attached to its last chunk (lowest sender key wins)."""
        meta = self._requests[request_id].metadata
        return meta[min(meta)] if meta else None

    def forget(self, request_id: int) -> None:
        """Drop a request's state; safe at any time (an open request fails first, its slot
        quarantined as for any failure)."""
        req = self._requests.get(request_id)
        if req is None:
            return
        if not req.cell.done:
            self._finish(request_id, req, "forgotten by the receiver")
        del self._requests[request_id]

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every ended request's keys are deleted and its slot released (senders
        acknowledge verdicts in the background); True when none is left."""
        deadline = time.monotonic() + (self.grace if timeout is None else timeout)
        while True:
            self._sweep(force=True)
            if not self._ended:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        """Fail open requests, release every slot (quarantined ones too), delete their keys
        and this receiver's registration, the pool registration and owned engine and arena.
        Idempotent."""
        for rid, req in list(self._requests.items()):
            if not req.cell.done:
                self._finish(rid, req, "the receiver was closed")
        self._requests.clear()
        self.settle(min(self.grace, CLOSE_WAIT))  # let senders read their verdicts
        for e in self._ended:
            e.deadline = 0.0
        self._sweep(force=True)
        try:
            info = self.control.get_or_none(self.control.key("recv"))
            if isinstance(info, dict) and info.get("inc") == self.incarnation:
                self.control.delete(self.control.key("recv"))
        except Exception:
            pass  # the control plane may be gone
        self._release_owned()

    # -- internals -------------------------------------------------------------------------

    def _dest_key(self, request_id: int) -> str:
        return self.control.key(self.incarnation, "dest", request_id)

    def _complete(self, request_id: int, req: _Request) -> None:
        for key, route in self.routes.items():
            counts = self._counts(req, key, landed_only=False)
            if any(c != req.num_tokens for c in counts):
                missing = [route.dst_layers.start + i for i, c in enumerate(counts)
                           if c != req.num_tokens]
                raise ValueError(f"every sender finished but only {min(counts)} of "
                                 f"{req.num_tokens} tokens of route {key} arrived (in layers "
                                 f"{missing[:8]})")
        base = req.slot.tensor
        if base.is_cuda:  # Success once the pool holds the bytes (polled, never waited)
            req.unpacked = torch.cuda.current_stream(base.device).record_event()
            req.cell.update(KVStatus.Transferring)
        else:
            self._finish(request_id, req)

    def _counts(self, req: _Request, key: str, landed_only: bool = True) -> list[int]:
        """Tokens per route-local layer of route ``key`` unpacked (or, with ``landed_only``
        False, also queued on the device) for the request."""
        counts = list(req.landed.setdefault(key, [0] * len(self.routes[key].dst_layers)))
        if not landed_only:
            for _, k, l0, l1, n in req.inflight:
                if k == key:
                    for i in range(l0, l1):
                        counts[i] += n
        return counts

    def _land(self, req: _Request, key: str, l0: int, l1: int, n: int) -> None:
        counts = req.landed.setdefault(key, [0] * len(self.routes[key].dst_layers))
        for i in range(l0, l1):
            counts[i] += n

    def _unpack(self, req: _Request, key: str, segment) -> None:
        """Check and unpack one landed packed segment into the request's pages."""
        t0, t1, p0, p1, l0, l1, crc = segment
        route, bpt, off = self.routes[key], self.route_bpt[key], req.regions[key]
        per_layer = (t1 - t0) * bpt // len(route.dst_layers)
        start = off + t0 * bpt + l0 * per_layer
        part = req.slot.tensor[start:start + (l1 - l0) * per_layer]
        if self.checksum:
            if crc is None:
                raise ValueError(f"route {key} tokens [{t0}, {t1}) layers [{l0}, {l1}): no "
                                 f"checksum")
            if crc32c_of(part) != crc:
                raise ValueError(f"route {key} tokens [{t0}, {t1}) layers [{l0}, {l1}): "
                                 f"checksum mismatch (the bytes changed on the way)")
        if req.ready is not None:
            torch.cuda.current_stream(part.device).wait_event(req.ready)
        d0, started = route.dst_layers.start, time.perf_counter()
        unpack_pages(part, self.cache, req.page_ids[p0:p1], num_tokens=t1 - t0,
                     heads=route.dst_heads, layers=(d0 + l0, d0 + l1), validate=False)
        if self.trace is not None:  # CPU: the unpack's span; CUDA: when it was queued
            self.trace.append(("unpack", req.rid, l0, l1, started, time.perf_counter()))
        if part.is_cuda:
            event = torch.cuda.current_stream(part.device).record_event()
            req.inflight.append((event, key, l0, l1, t1 - t0))
        else:
            self._land(req, key, l0, l1, t1 - t0)

    def layers_ready(self, request_id: int) -> int:
        """How many leading layers of this pool hold every token of the request (every head
        a route brings): a consumer may start on layers [0, k) before Success. Layers no
        route brings count as ready. Advances the request like `poll` (non-blocking); after
        a failure the count says nothing about the bytes. (An unknown request id raises
        KeyError.)"""
        self.poll(request_id)
        req = self._requests[request_id]
        if req.cell.status == KVStatus.Success:
            return self.cache.num_layers
        still = []
        for item in req.inflight:
            if item[0].query():
                self._land(req, *item[1:])
            else:
                still.append(item)
        req.inflight = still
        done = [True] * self.cache.num_layers
        for key, route in self.routes.items():
            for i, c in enumerate(self._counts(req, key)):
                if c != req.num_tokens:
                    done[route.dst_layers.start + i] = False
        return done.index(False) if False in done else self.cache.num_layers

    def _finish(self, request_id: int, req: _Request, reason: str | None = None) -> KVStatus:
        """End the request here: Success without ``reason``, else Failed. Publish the
        verdict, delete the destination, and keep what late writers could touch."""
        if reason is None:
            req.cell.update(KVStatus.Success)
        else:
            req.cell.fail(reason)
        now, slot, req.slot = time.monotonic(), req.slot, None
        if req.published:
            try:
                verdict = {"status": int(req.cell.status), "reason": req.cell.reason}
                self.control.put(req.prefix + "/verdict", verdict)
                # a sender that has not started learns at once that it need not
                self.control.put(self._dest_key(request_id),
                                 {"use": int(req.prefix.rsplit("/", 1)[1]), "ended": verdict})
            except Exception:
                pass  # the control plane may be gone; the local status is what counts
        writers = set() if reason is None or not req.published else \
            set(self.senders) - req.finished - req.ended
        readers = set(self.senders) - req.ended if req.published else set()
        if writers:  # quarantine: the slot (and direct pages) until they stop or grace ends
            self._ended.append(_Ended(req.prefix, self._dest_key(request_id), slot,
                                      req.host_ids if self.direct else None,
                                      writers, readers, dict(req.consumed), now + self.grace))
            if not self.direct:
                self._busy[req.host_ids] = False
            return req.cell.status
        if slot is not None:
            slot.release()
        self._busy[req.host_ids] = False
        if readers:
            self._ended.append(_Ended(req.prefix, self._dest_key(request_id), None, None, set(),
                                      readers, dict(req.consumed), now + self.grace))
        elif req.published:
            self._delete_keys(req.prefix, self._dest_key(request_id))
        return req.cell.status

    def _sweep(self, force: bool = False) -> None:
        """Look at ended requests: release slots whose writers all stopped, delete keys all
        senders have read; both at the latest after the grace period."""
        now = time.monotonic()
        if not self._ended or (not force and now - self._swept_at < SWEEP_INTERVAL):
            return
        self._swept_at = now
        left = []
        for e in self._ended:
            for sender in list(e.writers | e.readers):
                try:
                    lines = self.control.lines(f"{e.prefix}/note/{sender}",
                                               e.consumed.get(sender, 0))
                except Exception:
                    lines = []  # unreadable: only the grace period can end it
                for line in lines:
                    e.consumed[sender] = e.consumed.get(sender, 0) + 1
                    if isinstance(line, dict) and (line.get("end") or line.get("last") is True):
                        e.writers.discard(sender)
                    if isinstance(line, dict) and line.get("end"):
                        e.readers.discard(sender)
            expired = now > e.deadline
            if e.slot is not None and (not e.writers or expired):
                e.slot.release()
                e.slot = None
                if e.host_ids is not None:
                    self._busy[e.host_ids] = False
                    e.host_ids = None
            if e.slot is None and (not e.readers or expired):
                self._delete_keys(e.prefix, e.dest_key)
            else:
                left.append(e)
        self._ended = left

    def _delete_keys(self, prefix: str, dest_key: str) -> None:
        """Delete a use's keys; its destination only while it still names this use (the id
        may have been expected again since). Only this receiver writes destinations."""
        try:
            dest = self.control.get_or_none(dest_key)
            if isinstance(dest, dict) and dest.get("use") == int(prefix.rsplit("/", 1)[1]):
                self.control.delete(dest_key)
        except Exception:
            pass  # unreadable: leave it; the control plane may be gone
        try:
            self.control.delete(prefix + "/verdict",
                                *(f"{prefix}/note/{s}" for s in self.senders))
        except Exception:
            pass  # the control plane may be gone

    def _read_notes(self, rid: int, req: _Request) -> None:
        for sender in self.senders:
            if sender in req.finished:
                continue
            lines = self.control.lines(f"{req.prefix}/note/{sender}", req.consumed.get(sender, 0))
            for line in lines:
                req.consumed[sender] = req.consumed.get(sender, 0) + 1
                if isinstance(line, dict) and "end" in line:
                    req.ended.add(sender)
                    raise ValueError(f"sender {sender} failed: {str(line.get('reason'))[:200]}")
                self._accept(rid, req, sender, line)
                req.cell.update(KVStatus.Transferring)
                if sender in req.finished:
                    break

    def _accept(self, rid: int, req: _Request, sender: str, note) -> None:
        """Check one notification against the request; record its segment."""
        if not isinstance(note, dict):
            raise TypeError(f"sender {sender}: expected a notification dict, got "
                            f"{type(note).__name__}")
        ps, n = self.cache.page_size, req.num_tokens
        pages, tokens, nbytes = note.get("pages"), note.get("tokens"), note.get("nbytes")
        for name, v in (("pages", pages), ("tokens", tokens)):
            if not isinstance(v, list) or len(v) != 2 or not all(_int(x) for x in v):
                raise TypeError(f"sender {sender}: {name} must be two ints, got {str(v)[:40]}")
        if not _int(nbytes):
            raise TypeError(f"sender {sender}: non-integer field {nbytes!r}")
        (p0, p1), (t0, t1) = pages, tokens
        mode, crc, meta = note.get("mode", "packed"), note.get("crc"), note.get("metadata")
        if not isinstance(note.get("last"), bool) or (crc is not None and not _int(crc)) or \
                (meta is not None and not isinstance(meta, str)):
            raise TypeError(f"sender {sender}: malformed last/crc/metadata field")
        if not (0 <= p0 <= p1 <= req.page_ids.numel() and t0 == min(p0 * ps, n)
                and t1 == min(p1 * ps, n)):
            raise ValueError(f"sender {sender}: pages [{p0}, {p1}) / tokens [{t0}, {t1}) lie "
                             f"outside request {rid} ({req.page_ids.numel()} pages, {n} tokens)")
        key = self.senders[sender]
        route, bpt = self.routes[key], self.route_bpt[key]
        n_layers = len(route.dst_layers)
        layers = note.get("layers", [0, n_layers])
        if not isinstance(layers, list) or len(layers) != 2 or not all(_int(x) for x in layers):
            raise TypeError(f"sender {sender}: layers must be two ints, got {str(layers)[:40]}")
        l0, l1 = layers
        if not 0 <= l0 <= l1 <= n_layers:
            raise ValueError(f"sender {sender}: layers [{l0}, {l1}) lie outside route {key}'s "
                             f"{n_layers} layers")
        if mode == "packed":
            want = (t1 - t0) * bpt
        elif mode == "direct" and self.direct:
            full = whole_pages(self._registration(sender)[2], self.cache.num_heads, route)
            want = direct_nbytes(bpt, ps, range(p0, p1), range(t0, t1), full) if t1 > t0 else 0
        else:
            raise ValueError(f"sender {sender}: mode {str(mode)[:20]!r} is not accepted here")
        want = want // n_layers * (l1 - l0)
        if nbytes != want:
            raise ValueError(f"sender {sender}: tokens [{t0}, {t1}) layers [{l0}, {l1}) {mode} "
                             f"move {want} bytes, the notification says {nbytes}")
        segments = req.segments.setdefault(key, [])
        for a, b, c, d in segments:
            if t0 < b and a < t1 and l0 < d and c < l1:
                raise ValueError(f"sender {sender}: tokens [{t0}, {t1}) were already received "
                                 f"(layers [{l0}, {l1}) overlap tokens [{a}, {b}) layers "
                                 f"[{c}, {d}))")
        if t1 > t0 and l1 > l0:
            segments.append((t0, t1, l0, l1))
            if mode == "packed":
                self._unpack(req, key, (t0, t1, p0, p1, l0, l1, crc))
            else:  # a direct write landed in the pages before its notification
                self._land(req, key, l0, l1, t1 - t0)
        if meta:
            req.metadata[sender] = base64.b64decode(meta, validate=True)
        if note["last"]:
            req.finished.add(sender)
