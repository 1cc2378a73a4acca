"""KVReceiver: one agent per decode rank, receiving requests from any number of prefill instances.

Senders connect to the receiver's ``address`` and say who they are (instance, rank, sizes, the
model); a sender that cannot feed this pool is refused with the reason. Per request (one *use*:
one `expect` in this receiver's incarnation, naming the source instance): derive the routes from
the source instance's sizes and this rank's (`map_ranks`), reserve a staging slot (one region
per route; when the arena is momentarily full the request waits for space, within its timeout),
and push each expected sender its `Destination` once it has announced the request. In packed
mode only the staging arena is registered for remote writes, never the KV pool; direct mode (the
baseline, ``direct=True``) registers the pool too. Each `Note` names a segment (share pages and
tokens, route-local layers of one route) and is checked: an expected sender that holds the
destination, a token x layer range inside the request that no earlier note of its route
covered, exactly the bytes that range moves, and (with a checksum on: the kernels' digest, by
default on CUDA pools, or CRC32C) the checksum of the bytes that landed; any violation fails
the request.

Streaming: each checked packed segment is unpacked at once (on the receiver's worker thread)
into the request's own reserved pages, so layers arrive in the pool while the senders' prefill
still computes later ones; `layers_ready` says how many leading layers are complete. Success
only when every expected sender has sent its last segment and every layer of every route holds
every token; a failure or timeout leaves the request's pages holding undefined bytes; no page
outside the request is ever written, and once a request is reported ended nothing writes its
pages any more.

Fencing (fail closed): a request's staging slot (and, in direct mode, its pages) goes back to
the arena only when every sender that was given the destination has positively stopped: it
sent its last segment, or `End`, or its connection was closed by its side (its process ended:
no later write can come from it, after a short drain). A sender that holds a destination and
has said none of these — stalled, partitioned, or dropped by this side — keeps the slot
quarantined however long it takes; past ``grace`` seconds it is counted in
``stats()["quarantined_past_grace"]``. So an old use's bytes can land only in memory that no
other use owns, whatever the interleaving of stalls, timeouts and reuse.
"""

from __future__ import annotations

import base64
import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from .._checks import as_page_ids, check_count, check_int, check_num_tokens, check_seconds
from ..kernels import unpack_pages
from ..parallel import DcpLayout, ParallelRank, ParallelSizes
from ..staging import ArenaFullError, Slot, StagingArena
from .direct import direct_nbytes, pool_addresses, whole_pages
from .endpoint import Endpoint, check_peer, check_ready, dcp_of, route_senders, routes_between
from .engine import TransferEngine
from .link import Hub, Link
from .protocol import (
    Announce,
    Destination,
    End,
    Hello,
    Note,
    ProtocolError,
    Refused,
    SlotPlan,
    Verdict,
    Welcome,
    check_request_id,
    region_rows,
    segment_rows,
)
from .sender import checksum as crc32c_of
from .sender import digest_value, new_digest, route_spec
from .status import KVStatus, StatusCell

__all__ = ["KVReceiver"]

DRAIN = 0.5  # seconds a slot stays fenced after its sender's process is gone (bytes in flight)
CLOSE_WAIT = 2.0  # seconds `close` waits for senders to acknowledge verdicts
MAX_ENDED = 1 << 16  # verdicts remembered for senders that announce an ended request late


INTEGRITY = {"auto": None, False: "", None: "", True: "crc32c", "crc32c": "crc32c",
             "digest": "digest"}


def _check_digest(where: str, digest: torch.Tensor, check) -> None:
    if check is None:
        raise ValueError(f"{where}: no digest")
    if digest_value(digest) != check:
        raise ValueError(f"{where}: digest mismatch (the bytes changed on the way)")


def sender_id(instance: str, rank: ParallelRank) -> str:
    return f"{instance}/{rank.key}"


@dataclass
class _Writer:
    """One expected sender of one request."""

    route: str  # its route's key
    link: Link | None = None  # the connection it announced on
    holds: bool = False  # it was sent the destination
    finished: bool = False  # its last segment arrived
    ended: bool = False  # it said it writes no more (End)
    gone_at: float | None = None  # its side closed the connection (process ended)

    def stopped(self, now: float) -> bool:
        """Positively known to write nothing more into the slot."""
        return not self.holds or self.finished or self.ended or (
            self.gone_at is not None and now - self.gone_at >= DRAIN)


@dataclass
class _Request:
    rid: object
    source: str
    source_dp: int
    page_ids: torch.Tensor
    host_ids: torch.Tensor  # the same ids on the host (no device sync after the entry)
    busy: torch.Tensor  # those it writes (past the prefix): busy while it may write them
    num_tokens: int
    prefix: int  # tokens already in the pages: not sent
    deadline: float
    use: int
    ready: object = None  # the runner's CUDA event (unpack is ordered after it)
    cell: StatusCell = field(default_factory=StatusCell)
    routes: dict | None = None  # route key -> Route, once the source's sizes are known
    plan: SlotPlan | None = None
    writers: dict = field(default_factory=dict)  # sender id -> _Writer
    slot: Slot | None = None
    segments: dict = field(default_factory=dict)  # route key -> [(r0, r1, l0, l1)] rows
    landed: dict = field(default_factory=dict)  # route key -> [rows in the pool per layer]
    queued: int = 0  # segments waiting for the worker's unpack
    unpacking: bool = False  # the worker is writing its pages (a failure waits for it)
    failure: str | None = None  # a failure that came while it was
    inflight: list = field(default_factory=list)  # CUDA: (event, route key, l0, l1, tokens)
    unpacked: object = None  # CUDA: event after the last unpack (Success when it is done)
    metadata: dict = field(default_factory=dict)  # sender id -> bytes


@dataclass
class _Fenced:
    """An ended request's slot (and direct-mode pages) while a holder might still write."""

    rid: object
    use: int
    slot: Slot | None
    host_ids: torch.Tensor | None
    writers: dict
    deadline: float
    counted: bool = False


class KVReceiver(Endpoint):
    """Receives requests from the prefill senders that feed this decode rank.

    Args:
        cache: this decode rank's pool.
        instance, rank, sizes: this decode instance's name, this rank's coordinates and the
            instance's parallel sizes; with each source instance's sizes they decide which
            prefill ranks send which heads and layers here (`map_ranks`).
        kind, num_kv_heads, num_layers: the model (see `endpoint.model_shape`).
        host, port: where to listen for senders (``port=0``: a free port); ``address`` is
            what senders are given. Only ``host`` is listened on.
        direct: also accept direct writes into the pool (registers the pool for remote
            access; the baseline, off by default).
        engine, arena: shared ones, or None to create (and own) them.
        timeout: seconds a request may wait for every sender (and for staging space).
        checksum: what senders attach to every packed segment and the receiver checks before
            Success: "digest" (`cpkv.kernels.packed_digest`, computed inside the pack and
            unpack kernels as the bytes pass: no second pass on the GPU), "crc32c" (True:
            verified before the unpack, a pass over the bytes on both sides, on the host;
            needs ``crc32c``), or False. Default "auto": the digest for CUDA pools, none for
            CPU pools, where the torch path pays the digest as extra passes (1.3-7x a pack,
            `benchmarks/results/digest.csv`) and CRC32C is both cheaper and stronger.
        grace: seconds after which a slot still fenced by a silent sender is counted as
            quarantined past grace (it is never reused before that sender stops; default
            ``timeout``).
        secret: shared secret authenticating every message (default ``CPKV_SECRET``).

    Use as a context manager or call `close`.
    """

    def __init__(self, cache, *, instance: str = "decode", rank: ParallelRank | None = None,
                 sizes: ParallelSizes | None = None, kind: str = "mha",
                 num_kv_heads: int | None = None, num_layers: int | None = None,
                 dcp: DcpLayout | None = None,
                 host: str = "127.0.0.1", port: int = 0, direct: bool = False,
                 engine: TransferEngine | None = None, arena: StagingArena | None = None,
                 arena_bytes: int = 64 << 20, timeout: float = 30.0, checksum="auto",
                 grace: float | None = None, secret: str | bytes | None = None):
        if not isinstance(direct, bool):
            raise TypeError(f"direct: expected bool, got {type(direct).__name__}")
        if checksum not in INTEGRITY:
            raise ValueError(f"checksum: expected one of {list(INTEGRITY)}, got {checksum!r}")
        if grace is not None:
            check_seconds(grace, "grace", allow_zero=True)
        if not isinstance(host, str) or not host:
            raise TypeError(f"host: expected a non-empty str, got {host!r}")
        super().__init__(cache, instance=instance, rank=rank, sizes=sizes, kind=kind,
                         num_kv_heads=num_kv_heads, num_layers=num_layers, dcp=dcp, engine=engine,
                         arena=arena, arena_bytes=arena_bytes, timeout=timeout, secret=secret)
        self.direct = direct
        self.checksum = INTEGRITY[checksum] if checksum != "auto" else \
            "digest" if cache.device.type == "cuda" else ""  # measured: see the module doc
        self._layout = self.dcp or DcpLayout()  # where this rank keeps a request's tokens
        self.grace = self.timeout if grace is None else float(grace)
        self.hub = None
        try:
            if direct:
                self.register_pool()
            self.welcome = Welcome(**self._identity(),
                                   pool=pool_addresses(cache) if direct else None,
                                   integrity=self.checksum)
            self._requests: dict = {}
            self._senders: dict[str, tuple[Link, Hello]] = {}  # sender id -> its connection
            self._sources: dict[str, Hello] = {}  # instance -> a Hello of it (its sizes)
            self._announced: dict = {}  # rid -> {sender id: (link, when)} not yet expected
            self._ended: collections.OrderedDict = collections.OrderedDict()  # rid -> Verdict
            self._fenced: list[_Fenced] = []
            self._waiting: list = []  # requests waiting for staging space, in order
            self._unpacks: collections.deque = collections.deque()
            self._next_use = 0
            self._busy = torch.zeros(cache.num_pages, dtype=torch.bool)  # host bookkeeping
            self._past_grace = 0
            self.trace: list | None = None  # set to a list to record (what, rid, l0, l1, t0, t1)
            self._work = threading.Event()
            self._unpack_lock = threading.Lock()  # held while the worker writes pages
            self.hub = Hub(f"cpkv-recv-{instance}-{self.rank.key}-io", secret=self.secret,
                           on_open=lambda link: None, on_message=self._on_message,
                           on_close=self._on_close, listen=(host, port))
            self.address = self.hub.address
            self._worker = threading.Thread(target=self._run, daemon=True,
                                            name=f"cpkv-recv-{instance}-{self.rank.key}")
            self._worker.start()
        except BaseException:
            if self.hub is not None:
                self.hub.close()
            self._release_owned()
            raise

    # -- public ----------------------------------------------------------------------------

    def expect(self, request_id, page_ids, *, source: str, num_tokens: int | None = None,
               prefix: int = 0, source_dp: int = 0, ready=None) -> None:
        """Reserve a slot for a request from prefill instance ``source`` (its DP rank
        ``source_dp``) and tell its senders where to write it, as each announces it.

        ``num_tokens`` is the request's length (default: every entry of ``page_ids``; with DCP,
        required: the pages hold this rank's share). Its first ``prefix`` tokens are in the
        pages already (a prefix-cache hit): senders send the rest.

        ``ready``: the runner's ``torch.cuda.Stream`` or ``torch.cuda.Event`` after which the
        request's pages may be written (the unpack is ordered after it; in direct mode this
        call waits for it). Checked here; a problem found later (a sender that does not fit,
        a slot larger than the arena) fails the request with a reason, at once, and every
        sender of it hears that verdict.
        """
        check_request_id(request_id)
        if not isinstance(source, str) or not source:
            raise TypeError(f"source: expected the prefill instance's name, got {source!r}")
        check_count(source_dp, "source_dp")
        page_ids = as_page_ids(page_ids, self.cache.num_pages, self.cache.device, unique=True)
        if self.dcp is None:
            num_tokens = check_num_tokens(num_tokens, page_ids.numel(), self.cache.page_size)
        else:
            check_int(num_tokens, "num_tokens (the request's length, required with DCP)")
            check_num_tokens(self.dcp.count(num_tokens), page_ids.numel(), self.cache.page_size)
        check_int(prefix, "prefix", 0, num_tokens)
        event = check_ready(ready, self.cache.device)
        host_ids = page_ids.cpu().long()  # the entry's one read of the ids
        # pages wholly inside the prefix are never written: they stay free for others
        written = host_ids[self._layout.count(prefix) // self.cache.page_size:]
        with self._lock:
            if self._closed:
                raise RuntimeError("expect: the receiver is closed")
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already expected (forget it "
                                 f"first)")
            if written.numel() and bool(self._busy[written].any()):
                others = [r for r, q in self._requests.items() if not q.cell.done and bool(
                    torch.isin(q.busy, written).any())]
                raise ValueError(f"page_ids: some pages are still receiving request(s) "
                                 f"{others} (or a failed one's late writers); two requests in "
                                 f"flight must not share decode pages")
            if event is not None and self.direct:
                event.synchronize()  # senders write the pages directly
            req = _Request(request_id, source, source_dp, page_ids, host_ids, written,
                           num_tokens, prefix, time.monotonic() + self.timeout,
                           self._next_use, event)
            self._next_use += 1
            self._requests[request_id] = req
            self._ended.pop(request_id, None)
            self._busy[written] = True
            self._plan(req)
        self._work.set()

    def poll(self, request_id) -> KVStatus:
        """The request's status (non-blocking; the worker thread advances it). Never raises
        for anything a peer or the network did. (An unknown request id raises KeyError.)"""
        with self._lock:
            return self._status(request_id)

    def _status(self, request_id) -> KVStatus:
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} is not expected here")
        return req.cell.status

    def reason(self, request_id) -> str | None:
        return self._requests[request_id].cell.reason

    def metadata(self, request_id) -> bytes | None:
        """The blob a sender attached to its segments (lowest sender id wins)."""
        meta = self._requests[request_id].metadata
        return meta[min(meta)] if meta else None

    def layers_ready(self, request_id) -> int:
        """How many leading layers of this pool hold every token of the request (every head
        a route brings): a consumer may start on layers [0, k) before Success. Layers no
        route brings count as ready. After a failure the count says nothing about the
        bytes. (An unknown request id raises KeyError.)"""
        with self._lock:
            req = self._requests[request_id]
            if req.cell.status == KVStatus.Success:
                return self.cache.num_layers
            if req.routes is None:
                return 0
            self._land_events(req)
            done = [True] * self.cache.num_layers
            for key, route in req.routes.items():
                rows = req.plan.region(key)[1].num_tokens
                for i, c in enumerate(self._counts(req, key)):
                    if c != rows:
                        done[route.dst_layers.start + i] = False
            return done.index(False) if False in done else self.cache.num_layers

    def reject(self, request_id, reason: str) -> None:
        """This rank will not receive the request (the runner could not expect it, e.g. no
        pages for it): its senders hear a Failed verdict with ``reason`` at once, those that
        announced it and any that do later (the verdict is kept, bounded, until the id is expected
        again). An expected request is failed."""
        check_request_id(request_id)
        if not isinstance(reason, str):
            raise TypeError(f"reason: expected a str, got {type(reason).__name__}")
        with self._unpack_lock, self._lock:
            req = self._requests.get(request_id)
            if req is not None:
                self._finish(req, reason)
                return
            verdict = Verdict(request_id, self._next_use, int(KVStatus.Failed), reason)
            self._next_use += 1
            self._ended[request_id] = verdict
            for link, _ in self._announced.pop(request_id, {}).values():
                link.send(verdict)

    def connected(self) -> list[str]:
        """The senders connected now (``instance/dp.cp.tp.pp`` each)."""
        with self._lock:
            return sorted(s for s, (link, _) in self._senders.items() if link.open)

    def forget(self, request_id) -> None:
        """Drop a request's state; safe at any time (an open request fails first, its slot
        fenced as for any failure). After it returns, nothing writes the request's pages.
        To expect the id again at once, `settle` first (docs/transfer.md, reusing an id)."""
        with self._unpack_lock, self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return
            if not req.cell.done:
                self._finish(req, "forgotten by the receiver")
            del self._requests[request_id]
            # its verdict stays (bounded, MAX_ENDED): a sender that announces it late still
            # hears it at once; a new expect of the id clears it

    def stats(self) -> dict:
        """Resources in use: connections, connected senders, requests, fenced slots (and how
        many stayed fenced past ``grace``), staging bytes, late announcements kept."""
        with self._lock:
            return {"connections": len(self.hub.links()), "senders": len(self._senders),
                    "requests": len(self._requests), "fenced": len(self._fenced),
                    "quarantined_past_grace": self._past_grace,
                    "staging_bytes": self.arena.bytes_in_use,
                    "announced": sum(len(v) for v in self._announced.values()),
                    "waiting_for_space": len(self._waiting), "threads": 2}

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every ended request's slot is back in the arena (senders stop and
        acknowledge in the background); True when none is fenced."""
        deadline = time.monotonic() + (self.grace if timeout is None else timeout)
        while True:
            with self._lock:
                self._sweep(time.monotonic())
                if not self._fenced:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        """Fail open requests (their senders hear it), wait briefly for senders to stop,
        release every slot (fenced ones too: this process's arena goes with it), close the
        connections, the pool registration and owned engine and arena. Idempotent."""
        if not hasattr(self, "_worker"):
            self._release_owned()
            return
        with self._unpack_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            for req in list(self._requests.values()):
                if not req.cell.done:
                    self._finish(req, "the receiver was closed")
        self.settle(min(self.grace, CLOSE_WAIT))
        self._work.set()
        self._worker.join(timeout=10)
        with self._lock:
            for f in self._fenced:
                if f.slot is not None:
                    f.slot.release()
            self._fenced = []
        self.hub.flush(1.0)
        self.hub.close()
        self._release_owned()

    # -- planning (lock held) ----------------------------------------------------------------

    def _plan(self, req: _Request) -> None:
        """Routes, writers and a slot for the request, as far as known now."""
        if req.cell.done:
            return
        if req.routes is None:
            source = self._sources.get(req.source)
            if source is None:
                return  # the source's sizes come with its first sender's Hello
            routes = routes_between(source, self.welcome)
            if not routes:
                self._finish(req, f"instance {req.source} sends nothing to this rank "
                                  f"({self.rank}): no route")
                return
            req.routes = {r.key: r for r in routes}
            for r in routes:
                for rank in route_senders(r, source, req.source_dp):
                    req.writers[sender_id(req.source, rank)] = _Writer(r.key)
            rows = region_rows(self._layout, req.num_tokens, req.prefix)
            req.plan = SlotPlan.build([(r.key, self.route_format(r, rows, source=False))
                                       for r in routes])
            for sid, (link, _) in self._announced.pop(req.rid, {}).items():
                self._announce(req, sid, link, None)
                if req.cell.done:
                    return
        if req.slot is None:
            if req.plan.nbytes > self.arena.nbytes:
                self._finish(req, f"the request's slot ({req.plan.nbytes} bytes) cannot fit "
                                  f"this receiver's staging arena ({self.arena.nbytes} bytes)")
                return
            try:
                req.slot = self.arena.alloc(req.plan.nbytes)
            except ArenaFullError:
                if req not in self._waiting:
                    self._waiting.append(req)  # backpressure: wait for space
                return
            if req in self._waiting:
                self._waiting.remove(req)
            req.cell.update(KVStatus.WaitingForInput)
            for sid, w in req.writers.items():
                self._push_dest(req, sid, w)

    def _push_dest(self, req: _Request, sid: str, w: _Writer) -> None:
        """Send the destination to an expected sender that announced the request, or is
        connected already (pushed: it need not ask, and holds the slot until it ends)."""
        if w.link is None:
            connected = self._senders.get(sid)
            if connected is None or not connected[0].open:
                return
            w.link = connected[0]
        if not w.holds:
            self._send_dest(req, sid, w)

    def _send_dest(self, req: _Request, sid: str, w: _Writer) -> None:
        region, _ = req.plan.region(w.route)
        route = req.routes[w.route]
        w.holds = True  # from here on it may write into the slot
        w.link.send(Destination(req.rid, req.use, self.incarnation,
                                self.arena_addr + req.slot.offset, req.slot.nbytes, region,
                                route_spec(route), req.num_tokens, req.prefix,
                                req.page_ids.numel(),
                                req.host_ids.tolist() if self.direct else None))

    # -- messages (the I/O thread) ---------------------------------------------------------

    def _on_message(self, link: Link, msg) -> None:
        with self._lock:
            try:
                if link.peer is None:
                    self._on_hello(link, msg)
                elif isinstance(msg, Announce):
                    self._on_announce(link, msg)
                elif isinstance(msg, Note):
                    self._on_note(link, msg)
                elif isinstance(msg, End):
                    self._on_end(link, msg)
                else:
                    raise ProtocolError(f"unexpected {msg.TAG!r} from a sender")
            except ProtocolError as e:
                link.close(str(e))
        self._work.set()

    def _on_hello(self, link: Link, hello) -> None:
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected Hello first, got {hello.TAG!r}")
        sid = sender_id(hello.instance, hello.rank)
        try:
            hello.sizes.check(hello.rank)
            check_peer(self.welcome, hello, f"sender {sid}")
            known = self._sources.get(hello.instance)
            live = [s for s, (lk, _) in self._senders.items()
                    if s.startswith(hello.instance + "/") and lk.open]
            if known is not None and live and (known.sizes, known.model) != (
                    hello.sizes, hello.model):
                raise ProtocolError(f"instance {hello.instance} has sizes {known.sizes} "
                                    f"(senders {live[:4]} connected); sender {sid} says "
                                    f"{hello.sizes}")
            old = self._senders.get(sid)
            if old is not None and old[0].open:
                raise ProtocolError(f"duplicate sender: {sid} is connected already "
                                    f"(incarnation {old[1].incarnation}, this one "
                                    f"{hello.incarnation})")
        except ProtocolError as e:
            link.send(Refused(str(e)))
            if not str(e).startswith("duplicate sender"):  # requests it was to feed cannot
                for req in list(self._requests.values()):  # complete: end them now
                    if req.source == hello.instance and not req.cell.done and (
                            req.routes is None or sid in req.writers):
                        self._finish(req, f"sender {sid} was refused: {e}")
            raise
        link.peer = sid
        self._senders[sid] = (link, hello)
        self._sources[hello.instance] = hello
        link.send(self.welcome)
        for req in list(self._requests.values()):
            if req.source == hello.instance and not req.cell.done:
                if req.routes is None:
                    self._plan(req)
                elif sid in req.writers and req.slot is not None:
                    self._push_dest(req, sid, req.writers[sid])

    def _on_announce(self, link: Link, msg: Announce) -> None:
        sid = link.peer
        req = self._requests.get(msg.rid)
        if req is not None and not req.cell.done:
            self._announce(req, sid, link, msg)
        elif msg.rid in self._ended:
            link.send(self._ended[msg.rid])  # it ended already: say so at once
        elif req is None:  # not expected yet: the Destination follows the expect
            self._announced.setdefault(msg.rid, {})[sid] = (link, time.monotonic())

    def _announce(self, req: _Request, sid: str, link: Link, msg: Announce | None) -> None:
        if req.cell.done:
            return
        if req.routes is None:
            self._announced.setdefault(req.rid, {})[sid] = (link, time.monotonic())
            return
        w = req.writers.get(sid)
        if w is None:
            self._finish(req, f"sender {sid} announced the request but is not one of its "
                              f"expected senders {sorted(req.writers)[:8]} (the two sides "
                              f"disagree on sizes, routes or DP rank)")
            link.send(self._ended[req.rid])
            return
        if w.link is link and w.holds:
            return  # it has the destination already (pushed, or a duplicate announcement)
        w.link = link  # from here on it hears the verdict
        if msg is not None and msg.num_tokens != req.num_tokens:
            self._finish(req, f"sender {sid} has {msg.num_tokens} tokens, this receiver "
                              f"expects {req.num_tokens}")
            return
        if req.slot is not None and not w.holds:
            self._send_dest(req, sid, w)

    def _on_note(self, link: Link, note: Note) -> None:
        req = self._requests.get(note.rid)
        if req is None or req.use != note.use or req.cell.done:
            self._note_after_end(link.peer, note)
            return
        try:
            self._accept(req, link.peer, link, note)
        except (TypeError, ValueError) as e:
            self._finish(req, f"refused notification: {type(e).__name__}: {e}")

    def _note_after_end(self, sid: str, note: Note) -> None:
        """A note for an ended (fenced) use: its sender wrote its last segment."""
        if note.last:
            for f in self._fenced:
                if f.rid == note.rid and f.use == note.use and sid in f.writers:
                    f.writers[sid].finished = True

    def _on_end(self, link: Link, end: End) -> None:
        sid = link.peer
        for f in self._fenced:
            if f.rid == end.rid and f.use == end.use and sid in f.writers:
                f.writers[sid].ended = True
        req = self._requests.get(end.rid)
        if req is None or req.use != end.use:
            return
        w = req.writers.get(sid)
        if w is None:
            return
        w.ended = True
        if not req.cell.done:
            why = f"failed: {str(end.reason)[:300]}" if end.failed else \
                "ended the request before the verdict"
            self._finish(req, f"sender {sid} {why}")

    def _on_close(self, link: Link, reason: str, by_peer: bool) -> None:
        with self._lock:
            sid = link.peer
            if sid is None:
                return
            if self._senders.get(sid, (None,))[0] is link:
                del self._senders[sid]
            now = time.monotonic()
            for rid, pending in list(self._announced.items()):
                if pending.get(sid, (None,))[0] is link:
                    del pending[sid]
                if not pending:
                    del self._announced[rid]
            writers = [(f.writers[sid], None) for f in self._fenced if sid in f.writers]
            writers += [(req.writers[sid], req) for req in self._requests.values()
                        if sid in req.writers]
            for w, req in writers:
                if w.link is not link:
                    continue
                if by_peer:
                    w.gone_at = now
                if req is not None and not req.cell.done:  # it can hear no verdict
                    self._finish(req, f"sender {sid} disconnected: {reason}")
        self._work.set()

    # -- notes -----------------------------------------------------------------------------

    def _accept(self, req: _Request, sid: str, link: Link, note: Note) -> None:
        """Check one notification against the request; queue its segment for unpacking."""
        w = req.writers.get(sid)
        if w is None or not w.holds or w.link is not link:
            raise ValueError(f"sender {sid}: a note without the request's destination")
        if w.finished:
            raise ValueError(f"sender {sid}: a note after its last one")
        hello = self._senders[sid][1]
        ps, n = hello.page_size, req.num_tokens
        (p0, p1), (t0, t1), (l0, l1) = note.pages, note.tokens, note.layers
        src = dcp_of(hello)
        if src is None and not (0 <= p0 <= p1 and t0 == min(p0 * ps, n) and
                                t1 == min(p1 * ps, n) and -(-n // ps) >= p1):
            raise ValueError(f"sender {sid}: pages [{p0}, {p1}) / tokens [{t0}, {t1}) lie "
                             f"outside request {req.rid!r} ({n} tokens in pages of {ps})")
        if src is not None and (t0, t1) != (0, n):
            raise ValueError(f"sender {sid}: a DCP-sharded sender sends the whole request "
                             f"[0, {n}), its note says [{t0}, {t1})")
        route = req.routes[w.route]
        bpr = req.plan.region(w.route)[1].token_nbytes
        n_layers = len(route.dst_layers)
        if not 0 <= l0 <= l1 <= n_layers:
            raise ValueError(f"sender {sid}: layers [{l0}, {l1}) lie outside route "
                             f"{w.route}'s {n_layers} layers")
        if note.mode not in ("packed", "direct") or note.mode == "direct" and not (
                self.direct and ps == self.cache.page_size):
            raise ValueError(f"sender {sid}: mode {note.mode[:20]!r} is not accepted here")
        sel, r0 = segment_rows(self._layout, src, (t0, t1), n, req.prefix)
        r1 = r0 + sel.count
        plain = src is None and self.dcp is None and req.prefix == 0
        if note.mode == "direct" and plain:  # whole pages where both sides hold every head
            full = whole_pages(hello.num_heads, self.cache.num_heads, route)
            want = direct_nbytes(bpr, ps, range(p0, p1), range(t0, t1), full) if t1 > t0 else 0
        else:
            want = sel.count * bpr
        want = want // n_layers * (l1 - l0)
        if note.nbytes != want:
            raise ValueError(f"sender {sid}: tokens [{t0}, {t1}) layers [{l0}, {l1}) "
                             f"{note.mode} move {want} bytes, the notification says "
                             f"{note.nbytes}")
        segments = req.segments.setdefault(w.route, [])
        for a, b, c, d in segments:
            if r0 < b and a < r1 and l0 < d and c < l1:
                raise ValueError(f"sender {sid}: tokens [{t0}, {t1}) were already received "
                                 f"(layers [{l0}, {l1}) overlap rows [{a}, {b}) layers "
                                 f"[{c}, {d}))")
        if note.metadata:
            try:
                req.metadata[sid] = base64.b64decode(note.metadata, validate=True)
            except ValueError:
                raise ValueError(f"sender {sid}: malformed metadata") from None
        if r1 > r0 and l1 > l0:
            segments.append((r0, r1, l0, l1))
            if note.mode == "packed":
                if self.checksum and note.check is None:
                    raise ValueError(f"sender {sid}: tokens [{t0}, {t1}) layers [{l0}, {l1}): "
                                     f"no checksum")
                req.queued += 1
                self._unpacks.append((req, w.route, (r0, r1, l0, l1), sel, note.check))
            else:  # a direct write landed in the pages before its notification
                self._land(req, w.route, l0, l1, r1 - r0)
        req.cell.update(KVStatus.Transferring)
        if note.last:
            w.finished = True

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        if self.cache.device.type == "cuda":
            torch.cuda.set_device(self.cache.device)
        while True:
            with self._lock:
                if self._closed and not self._unpacks:
                    return
                job = self._unpacks.popleft() if self._unpacks else None
            if job is not None:
                self._unpack(*job)
                continue
            self._work.wait(self._next_check())
            self._work.clear()
            with self._lock:
                now = time.monotonic()
                for req in list(self._requests.values()):
                    self._advance(req, now)
                self._sweep(now)
                for req in list(self._waiting):
                    self._plan(req)
                for rid in [r for r, a in self._announced.items()
                            if all(now - t > self.timeout for _, t in a.values())]:
                    del self._announced[rid]

    def _next_check(self) -> float:
        with self._lock:
            now, soon = time.monotonic(), 1.0
            for req in self._requests.values():
                if not req.cell.done:
                    soon = min(soon, req.deadline - now, 0.002 if req.inflight or
                               req.unpacked is not None else 1.0)
            if self._fenced:
                soon = min(soon, 0.05)
            return max(soon, 0.0005)

    def _advance(self, req: _Request, now: float) -> None:
        """Deadline, CUDA completions and completion of one request (lock held)."""
        if req.cell.done:
            return
        if req.unpacked is not None:
            if req.unpacked.query():
                self._finish(req)
            return
        if now > req.deadline:
            missing = sorted(s for s, w in req.writers.items() if not w.finished)
            where = "for staging space" if req in self._waiting else \
                f"for senders {missing[:8]}" if req.routes is not None else \
                f"for a sender of instance {req.source} to connect"
            self._finish(req, f"timed out after {self.timeout} s waiting {where}")
            return
        self._land_events(req)
        if req.writers and not req.queued and all(w.finished for w in req.writers.values()):
            self._complete(req)

    def _unpack(self, req: _Request, key: str, segment, sel, check) -> None:
        """Check and unpack one landed packed segment into the request's pages."""
        r0, r1, l0, l1 = segment
        with self._unpack_lock:
            with self._lock:
                req.queued -= 1
                if req.cell.done or req.slot is None:
                    return
                route = req.routes[key]
                region, fmt = req.plan.region(key)
                offset, nbytes = SlotPlan.segment(region, fmt, (r0, r1), (l0, l1))
                part = req.slot.tensor[offset:offset + nbytes]
                req.unpacking = True
            try:
                where = f"route {key} rows [{r0}, {r1}) layers [{l0}, {l1})"
                if self.checksum == "crc32c" and crc32c_of(part) != check:
                    raise ValueError(f"{where}: checksum mismatch (the bytes changed on the way)")
                digest = new_digest(part.device) if self.checksum == "digest" else None
                if req.ready is not None:
                    torch.cuda.current_stream(part.device).wait_event(req.ready)
                d0 = route.dst_layers.start
                started = time.perf_counter()
                # rows land at consecutive local tokens from dst_start (mid-page where the
                # sender's page size differs or a prefix is there), or where DCP puts them
                place = dict(token_offset=sel.dst_start, num_tokens=sel.count) \
                    if sel.dst_contiguous else dict(tokens=sel.tensors(part.device)[1])
                unpack_pages(part, self.cache, req.page_ids, heads=route.dst_heads,
                             layers=(d0 + l0, d0 + l1), digest=digest, validate=False, **place)
                if digest is not None:  # computed as the bytes passed: checked before Success
                    if part.is_cuda:  # read once the unpack has run (no wait here)
                        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
                        digest = host.copy_(digest, non_blocking=True)
                    else:
                        _check_digest(where, digest, check)
                        digest = None
            except Exception as e:
                with self._lock:
                    req.unpacking = False
                    self._finish(req, f"refused notification: {type(e).__name__}: {e}")
                return
            with self._lock:
                req.unpacking = False
                if req.failure is not None:
                    self._finish(req, req.failure)
                    return
                if self.trace is not None:  # CPU: the unpack's span; CUDA: when it was queued
                    self.trace.append(("unpack", req.rid, l0, l1, started, time.perf_counter()))
                if part.is_cuda:
                    event = torch.cuda.current_stream(part.device).record_event()
                    req.inflight.append((event, key, l0, l1, r1 - r0, digest, check, where))
                else:
                    self._land(req, key, l0, l1, r1 - r0)
                self._advance(req, time.monotonic())

    def _land_events(self, req: _Request) -> None:
        still = []
        for item in req.inflight:
            event, key, l0, l1, rows, digest, check, where = item
            if event.query():
                if digest is not None:
                    try:
                        _check_digest(where, digest, check)
                    except ValueError as e:
                        self._finish(req, f"refused notification: {e}")
                        return
                self._land(req, key, l0, l1, rows)
            else:
                still.append(item)
        req.inflight = still

    def _complete(self, req: _Request) -> None:
        for key, route in req.routes.items():
            rows = req.plan.region(key)[1].num_tokens
            counts = self._counts(req, key, landed_only=False)
            if any(c != rows for c in counts):
                missing = [route.dst_layers.start + i for i, c in enumerate(counts)
                           if c != rows]
                self._finish(req, f"every sender finished but only {min(counts)} of "
                                  f"{rows} tokens of route {key} arrived (in "
                                  f"layers {missing[:8]})")
                return
        if req.slot.tensor.is_cuda:  # Success once the pool holds the bytes (polled)
            req.unpacked = torch.cuda.current_stream(req.slot.tensor.device).record_event()
        else:
            self._finish(req)

    def _counts(self, req: _Request, key: str, landed_only: bool = True) -> list[int]:
        counts = list(req.landed.setdefault(key, [0] * len(req.routes[key].dst_layers)))
        if not landed_only:
            for _, k, l0, l1, n, *_ in req.inflight:
                if k == key:
                    for i in range(l0, l1):
                        counts[i] += n
        return counts

    def _land(self, req: _Request, key: str, l0: int, l1: int, n: int) -> None:
        counts = req.landed.setdefault(key, [0] * len(req.routes[key].dst_layers))
        for i in range(l0, l1):
            counts[i] += n

    # -- ending (lock held) ------------------------------------------------------------------

    def _finish(self, req: _Request, reason: str | None = None) -> None:
        """End the request: Success without ``reason``, else Failed. Tell every sender that
        announced it, remember the verdict for late ones, and fence what they could touch."""
        if req.cell.done:
            return
        if req.unpacking:  # report it once the pages are no longer being written
            req.failure = req.failure or reason
            return
        for event, *_ in req.inflight:  # CUDA: queued unpacks finish before the verdict
            event.synchronize()
        if reason is None:
            req.cell.update(KVStatus.Success)
        else:
            req.cell.fail(reason)
        if req in self._waiting:
            self._waiting.remove(req)
        verdict = Verdict(req.rid, req.use, int(req.cell.status), req.cell.reason)
        self._ended[req.rid] = verdict
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        for link, _ in self._announced.pop(req.rid, {}).values():
            link.send(verdict)
        for w in req.writers.values():
            if w.link is not None:
                w.link.send(verdict)
        slot, req.slot = req.slot, None
        now = time.monotonic()
        if any(not w.stopped(now) for w in req.writers.values()):
            self._fenced.append(_Fenced(req.rid, req.use, slot,
                                        req.busy if self.direct else None,
                                        dict(req.writers), now + self.grace))
            if not self.direct:
                self._busy[req.busy] = False
        else:
            if slot is not None:
                slot.release()
            self._busy[req.busy] = False
        self._notify()
        self._work.set()

    def _sweep(self, now: float) -> None:
        """Release fenced slots whose holders all stopped; count those past the grace."""
        left = []
        for f in self._fenced:
            if all(w.stopped(now) for w in f.writers.values()):
                if f.slot is not None:
                    f.slot.release()
                if f.host_ids is not None:
                    self._busy[f.host_ids] = False
                continue
            if now > f.deadline and not f.counted:
                f.counted = True
                self._past_grace += 1
            left.append(f)
        if len(left) != len(self._fenced):
            self._fenced = left
            for req in list(self._waiting):
                self._plan(req)
        self._fenced = left
