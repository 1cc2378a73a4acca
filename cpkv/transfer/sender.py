"""KVSender: one agent per prefill rank, shipping each request to the decode receivers it names.

A request names its receivers (``to=``: their addresses, e.g. every rank of the decode instance
the router picked). Per receiver (a *leg*): connect on first use (one connection per receiver,
reused by every request, closed when idle), say who this rank is (`protocol.Hello`), learn who
the receiver is (`Welcome`) and so the route this rank feeds it (`map_ranks` of both
instances' sizes; a rank with no route to a receiver has nothing to send it), announce the
request, and get its `Destination` (pushed by the receiver once it expects the request). Then
per call (one prefill chunk, and the layers of it computed so far) ship the route's layers that
became ready since the last call, either

* packed: pack the share (the route's heads and layers) into local staging slots, layer group by
  layer group, submitting each group's write while packing the next; or
* direct: one descriptor per contiguous page run (or per token, for a head slice) straight into
  the receiver's pool, where the receiver allows it;

and notify each group (`Note`) as soon as it has landed, so the receiver unpacks it while later
groups travel. A rank whose share is empty still notifies its last call (zero bytes). The
worker thread packs and submits; a landing thread waits for writes in order and notifies; the
I/O thread (`link.Hub`) reads messages. Three threads per agent, whatever the number of peers
or requests in flight; ``poll`` never blocks and `wait` wakes as soon as a verdict arrives.

Layer-wise: a runner calls ``send_layers(rid, page_ids, upto, to=...)`` as its forward pass
proceeds ("layers below ``upto`` of this chunk are computed"). Layers smaller than ``coalesce``
bytes wait for more (unless they complete the chunk's route layers or the call is the last), so
per-layer calls do not multiply descriptors and notifications. `send` is ``send_layers`` with
every layer ready.

Fencing (fail closed): a write is submitted only while this rank positively holds the request's
destination for the receiver's current use, on the open connection it came on, and has heard no
verdict for it; a missing destination, a closed connection or a verdict means stop. After its
last segment the sender waits for the receiver's verdict, ends in the same status and sends
`End` once none of its writes is in flight; a failed leg sends `End` with its reason the same
way. The receiver releases a failed request's slot only after every sender that held its
destination has ended (or its process is gone), so a write that was already submitted lands in
memory no other request uses.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import queue
import threading
import time

import torch

from .._checks import as_page_ids, check_int, check_num_tokens, check_seconds, is_int
from ..cp.partition import SenderPolicy, chunk_share
from ..kernels import pack_pages
from ..parallel import LAYER_GROUP_BYTES, DcpLayout, ParallelRank, ParallelSizes, layer_groups
from ..staging import StagingArena
from .cost import CostModel
from .direct import direct_descriptors, direct_segments, whole_pages
from .endpoint import Endpoint, check_peer, check_ready, dcp_of, feeds, routes_between
from .engine import TransferEngine
from .link import Hub, Link, parse_address
from .mapping import Route
from .protocol import (
    Announce,
    Destination,
    End,
    Hello,
    Note,
    ProtocolError,
    Refused,
    RouteSpec,
    SlotPlan,
    Verdict,
    Welcome,
    check_request_id,
    region_rows,
    segment_rows,
)
from .status import KVStatus, StatusCell

__all__ = ["KVSender", "checksum"]

PIPELINE_CHUNK_BYTES = LAYER_GROUP_BYTES  # a segment's layer groups need be no larger
PIPELINE_GROUPS = 1  # a smaller segment is cut in about this many groups, so that the first is
PIPELINE_MIN_BYTES = 256 << 10  # on the wire while the rest pack (but none under this size)
COALESCE_BYTES = 1 << 20  # newly ready layers smaller than this wait for more (see send_layers)
MODES = ("packed", "direct", "auto")


def checksum(buf: torch.Tensor, value: int = 0) -> int:
    """CRC32C of a contiguous uint8 buffer, continuing from ``value`` (chunks chain). On a CUDA
    buffer the bytes are copied to the host first (a synchronisation)."""
    try:
        import crc32c
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("checksums need the crc32c package: pip install 'cpkv[integrity]'"
                          ) from e
    host = buf.cpu() if buf.is_cuda else buf
    return crc32c.crc32c(memoryview(host.numpy()), value=value)


def new_digest(device) -> torch.Tensor:
    """A [1] int64 counter the pack or unpack adds a segment's digest to."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def digest_value(digest: torch.Tensor) -> int:
    """The digest as the wire carries it, in [0, 2**64) (read once the kernel is done)."""
    return int(digest.cpu()[0]) & 0xFFFFFFFFFFFFFFFF


def group_bytes(nbytes: int) -> int:
    """The least size of a layer group of a segment of ``nbytes`` (see PIPELINE_GROUPS).

    >>> [group_bytes(n) >> 10 for n in (1 << 10, 2 << 20, 64 << 20, 1 << 30)]
    [256, 2048, 16384, 16384]
    """
    return min(PIPELINE_CHUNK_BYTES, max(PIPELINE_MIN_BYTES, -(-nbytes // PIPELINE_GROUPS)))


def request_key(rid) -> int:
    """A non-negative int standing for a request id (the ``rotate`` policy's rank choice):
    the id itself, or a stable hash of a string id."""
    if is_int(rid):
        return rid
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "big") >> 1


def route_of(spec: RouteSpec) -> Route:
    return Route(spec.tp, spec.pp, range(*spec.src_heads), range(*spec.dst_heads),
                 range(*spec.src_layers), range(*spec.dst_layers))


def route_spec(route: Route) -> RouteSpec:
    return RouteSpec(route.tp, route.pp, (route.src_heads.start, route.src_heads.stop),
                     (route.dst_heads.start, route.dst_heads.stop),
                     (route.src_layers.start, route.src_layers.stop),
                     (route.dst_layers.start, route.dst_layers.stop))


class _Stopped(Exception):
    """This leg must not write any more (its reason is already recorded)."""


class _Peer:
    """One receiver this rank ships to: its connection and what it said about itself."""

    def __init__(self, address: str):
        self.address = address
        self.link: Link | None = None
        self.welcome: Welcome | None = None
        self.error: str | None = None  # why the last connection failed or was refused
        self.legs: dict = {}  # rid -> _Leg not yet ended
        self.pushed: dict = {}  # rid -> (Destination, deadline) pushed on `link` before this
        # rank had the request (dropped with the connection: it was for that one only)
        self.used_at = time.monotonic()


class _Leg:
    """One request to one receiver."""

    def __init__(self, state, peer: _Peer, deadline: float):
        self.state, self.peer = state, peer
        self.link: Link | None = None  # the connection the destination came on
        self.route: Route | None = None
        self.no_route = False  # this rank feeds the receiver nothing
        self.announced = False
        self.dest: Destination | None = None
        self.welcome: Welcome | None = None  # the receiver, as it was when it gave dest
        self.verdict: tuple[int, str | None] | None = None
        self.error: str | None = None  # this side failed the leg
        self.writes = 0  # submitted, not yet landed and notified
        self.finished = False  # last segment notified
        self.ended = False  # End sent (or nothing left to say to anyone)
        self.deadline = deadline  # for the destination, then for the verdict
        self.sent: dict = {}  # chunk -> route-local layers below this are shipped
        self.claimed = False  # a job ran for it: it may have written under its destination
        self.metadata = None
        self.mode = None

    @property
    def terminal(self) -> bool:
        return self.no_route or self.verdict is not None or self.error is not None


class _Send:
    """One request on this sender: what the user sees (cell) and its legs."""

    def __init__(self, rid, to: tuple[str, ...], num_tokens: int, num_pages: int):
        self.rid, self.to = rid, to
        self.num_tokens, self.num_pages = num_tokens, num_pages
        self.cell = StatusCell()
        self.legs: dict[str, _Leg] = {}
        self.marks: dict = {}  # chunk -> layers below this are ready (caller's side)
        self.jobs = 0  # queued calls not yet run
        self.last_called = False  # a later call is a new use of the id: refused


@dataclasses.dataclass
class _Job:
    state: _Send
    page_ids: torch.Tensor
    chunk: tuple[int, int]
    upto: int
    last: bool
    metadata: bytes | None
    event: object


class KVSender(Endpoint):
    """Ships this prefill rank's share of each request to the decode receivers it names.

    Args:
        cache: this rank's pool (after the CP all-gather it holds the whole sequence).
        instance: this prefill engine's name; with ``rank`` it names this sender to every
            receiver, so two instances with the same coordinates never collide.
        rank, sizes: this rank's coordinates and the instance's parallel sizes. CP ranks of
            the instance each send their page share under ``policy``.
        kind, num_kv_heads, num_layers: the model (see `endpoint.model_shape`): defaults from
            the pool; ``num_layers`` is required with PP.
        policy: "all" (disjoint page shares), "rank0", or "rotate" (one rank per request).
        mode: "packed", "direct" (needs a receiver that allows it) or "auto" (the cost model
            picks per request; packed where direct is not allowed).
        cost: the cost model for "auto" (default: `CostModel.load()`).
        engine, arena: shared ones, or None to create (and own) them.
        timeout: seconds to wait for a request's destination, for staging space and for the
            receiver's verdict after the last segment.
        coalesce: bytes below which newly ready layers wait for more (`send_layers`); 0
            ships every call's layers at once.
        idle: seconds after which a connection with no request in flight is closed.
        secret: shared secret authenticating every message (default ``CPKV_SECRET``).

    Use as a context manager (``with KVSender(...) as s:``) or call `close`.
    """

    def __init__(self, cache, *, instance: str = "prefill", rank: ParallelRank | None = None,
                 sizes: ParallelSizes | None = None, kind: str = "mha",
                 num_kv_heads: int | None = None, num_layers: int | None = None,
                 dcp: DcpLayout | None = None,
                 policy: SenderPolicy | str = "all", mode: str = "packed",
                 cost: CostModel | None = None, engine: TransferEngine | None = None,
                 arena: StagingArena | None = None, arena_bytes: int = 64 << 20,
                 timeout: float = 30.0, coalesce: int = COALESCE_BYTES, idle: float = 60.0,
                 secret: str | bytes | None = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        check_int(coalesce, "coalesce")
        check_seconds(idle, "idle")
        policy = SenderPolicy(policy)
        super().__init__(cache, instance=instance, rank=rank, sizes=sizes, kind=kind,
                         num_kv_heads=num_kv_heads, num_layers=num_layers, dcp=dcp, engine=engine,
                         arena=arena, arena_bytes=arena_bytes, timeout=timeout, secret=secret)
        self.policy, self.mode, self.coalesce, self.idle = policy, mode, coalesce, float(idle)
        self.cost = cost if cost is not None or mode != "auto" else CostModel.load()
        self.hub = None
        try:
            if mode != "packed":
                self.register_pool()
            self.hello = Hello(**self._identity())
            self._peers: dict[str, _Peer] = {}
            self._states: dict = {}
            self._jobs: list[_Job] = []
            self._work = threading.Event()
            self._landing: queue.Queue = queue.Queue()
            self.trace: list | None = None  # set to a list to record (what, rid, l0, l1, t0, t1)
            name = f"cpkv-send-{instance}-{self.rank.key}"
            self.hub = Hub(f"{name}-io", secret=self.secret, on_open=self._on_open,
                           on_message=self._on_message, on_close=self._on_close)
            self._worker = threading.Thread(target=self._run, name=name, daemon=True)
            self._lander = threading.Thread(target=self._land_loop, name=f"{name}-land",
                                            daemon=True)
            self._worker.start()
            self._lander.start()
        except BaseException:
            if self.hub is not None:
                self.hub.close()
            self._release_owned()
            raise

    # -- public ----------------------------------------------------------------------------

    def send(self, request_id, page_ids, *, to, num_tokens: int | None = None,
             chunk: tuple[int, int] | None = None, last: bool = True,
             metadata: bytes | None = None, ready=None) -> None:
        """Queue one chunk of a request with every layer ready (non-blocking): `send_layers`
        with ``upto`` = every layer of the pool. Poll its status with `poll` or `wait`."""
        self.send_layers(request_id, page_ids, self.cache.num_layers, to=to,
                         num_tokens=num_tokens, chunk=chunk, last=last, metadata=metadata,
                         ready=ready)

    def send_layers(self, request_id, page_ids, upto: int, *, to,
                    num_tokens: int | None = None, chunk: tuple[int, int] | None = None,
                    last: bool = False, metadata: bytes | None = None, ready=None) -> None:
        """Queue the layers of one chunk of a request that are now computed (non-blocking).

        Args:
            request_id: the request (a non-negative int or a string; the receivers expect the
                same id). An id that already ended here must be `forget`-ed before reuse.
            page_ids: [n_pages] this pool's page ids of the whole request, in request order.
            upto: layers [0, upto) of this pool are computed for this chunk (a watermark: it
                never decreases for a chunk; layers outside a route are ignored, and a route
                starting at layer s ships nothing before ``upto > s``).
            to: the decode receivers of this request: an address ("host:port") or a list of
                them (e.g. every rank of the decode instance); the same on every call of the
                request. This rank ships to each the route it feeds it, if any.
            num_tokens: tokens of the whole request (default: every entry of its pages).
            chunk: request-local pages [start, stop) of this prefill chunk (default: all).
            last: whether this is the request's last call; decide it before filtering by
                share, so every rank agrees (a rank with an empty share still sends it). Every
                chunk's ``upto`` must then cover the routes' layers.
            metadata: a small blob (e.g. the first output token), carried by this sender's
                next notification to each receiver (give it with the last call).
            ready: the runner's ``torch.cuda.Stream`` (an event is recorded on it now) or a
                ``torch.cuda.Event`` after which these layers are written; the pack is ordered
                after it, and a direct write waits for it. CUDA pools only.

        Everything is checked here, before anything is queued; the worker trusts it.
        """
        check_request_id(request_id)
        targets = self._check_to(to)
        page_ids = as_page_ids(page_ids, self.cache.num_pages, self.cache.device)
        n_pages = page_ids.numel()
        if self.dcp is None:
            num_tokens = check_num_tokens(num_tokens, n_pages, self.cache.page_size)
        else:  # the pages hold this rank's share of the request's tokens
            check_int(num_tokens, "num_tokens (the request's length, required with DCP)")
            check_num_tokens(self.dcp.count(num_tokens), n_pages, self.cache.page_size)
            if chunk is not None and tuple(chunk) != (0, n_pages):
                raise ValueError(f"chunk: a DCP-sharded sender sends whole requests, got "
                                 f"{chunk!r}")
        check_int(upto, "upto", 0, self.cache.num_layers)
        if chunk is not None and (not isinstance(chunk, (tuple, list)) or len(chunk) != 2 or
                                  not all(is_int(v) for v in chunk)):
            raise TypeError(f"chunk: expected a (start, stop) pair of ints, got {chunk!r}")
        start, stop = chunk if chunk is not None else (0, n_pages)
        if not 0 <= start <= stop <= n_pages:
            raise ValueError(f"chunk: expected 0 <= start <= stop <= {n_pages}, "
                             f"got [{start}, {stop})")
        if not isinstance(last, bool):
            raise TypeError(f"last: expected bool, got {type(last).__name__}")
        if metadata is not None and not isinstance(metadata, bytes):
            raise TypeError(f"metadata: expected bytes, got {type(metadata).__name__}")
        event = check_ready(ready, self.cache.device)
        with self._lock:
            if self._closed:
                raise RuntimeError("send: the sender is closed")
            state = self._states.get(request_id)
            if state is not None:
                if state.last_called:
                    raise ValueError(f"request {request_id!r} already made its last call here "
                                     f"({state.cell.status.name}); forget it before sending "
                                     f"the id again")
                if state.to != targets or state.num_tokens != num_tokens or \
                        state.num_pages != n_pages:
                    raise ValueError(f"request {request_id!r}: every call must name the same "
                                     f"receivers, tokens and pages (first call: to "
                                     f"{list(state.to)}, {state.num_tokens} tokens, "
                                     f"{state.num_pages} pages)")
            fresh = state is None
            if fresh:
                state = _Send(request_id, targets, num_tokens, n_pages)
            before = state.marks.get((start, stop), 0)
            if upto < before:
                raise ValueError(f"upto: expected at least {before} (layers already reported "
                                 f"ready for chunk [{start}, {stop})), got {upto}")
            marks = {**state.marks, (start, stop): upto}
            end = self.cache.num_layers  # every route this rank feeds ends at or before it
            short = [c for c, m in marks.items() if m < end]
            if last and short:
                raise ValueError(f"last: chunks {short} have not reported every layer "
                                 f"(upto >= {end}) yet")
            state.marks = marks
            state.last_called = last
            if fresh:
                self._states[request_id] = state
                deadline = time.monotonic() + self.timeout
                for address in targets:
                    peer = self._peer(address)
                    leg = state.legs[address] = _Leg(state, peer, deadline)
                    peer.legs[request_id] = leg
                    peer.used_at = time.monotonic()
                    if peer.welcome is not None:
                        self._welcome_leg(leg)
            state.jobs += 1
            self._jobs.append(_Job(state, page_ids, (start, stop), upto, last, metadata, event))
        self._work.set()

    def poll(self, request_id) -> KVStatus:
        """This rank's status for the request (non-blocking): Bootstrapping until every
        receiver gave its destination, Transferring until every verdict arrived, then Success
        if every receiver reported Success, else Failed (`reason` says which and why)."""
        with self._lock:
            return self._status(request_id)

    def _status(self, request_id) -> KVStatus:
        state = self._states.get(request_id)
        return KVStatus.Bootstrapping if state is None else state.cell.status

    def reason(self, request_id) -> str | None:
        state = self._states.get(request_id)
        return state.cell.reason if state else None

    def mode_of(self, request_id) -> str | None:
        """The mode ("packed" or "direct") this rank's last segment of the request used."""
        state = self._states.get(request_id)
        if state is None:
            return None
        modes = [leg.mode for leg in state.legs.values() if leg.mode]
        return modes[-1] if modes else None

    def forget(self, request_id) -> None:
        """Drop a request's state (safe at any time: work in flight finishes in the
        background and still ends every receiver's use)."""
        with self._lock:
            self._states.pop(request_id, None)

    def stats(self) -> dict:
        """Resources in use: connections, receivers known, requests not yet ended, threads."""
        with self._lock:
            legs = sum(len(p.legs) for p in self._peers.values())
            return {"connections": len(self.hub.links()), "peers": len(self._peers),
                    "open_legs": legs, "requests": len(self._states), "threads": 3}

    def close(self) -> None:
        """Stop sending (open requests fail, their receivers are told), close every
        connection, release owned engine and arena. Idempotent."""
        with self._lock:
            if self._closed or not hasattr(self, "_worker"):
                closed_early = not hasattr(self, "_worker")
                self._closed = True
                if not closed_early:
                    return
            self._closed = True
        if hasattr(self, "_worker"):
            self._work.set()
            self._worker.join(timeout=self.timeout + 5)
            self._landing.put(None)
            self._lander.join(timeout=self.timeout + 5)
            with self._lock:
                for peer in self._peers.values():
                    for leg in list(peer.legs.values()):
                        self._fail_leg(leg, "the sender was closed")
            self.hub.flush(1.0)
            self.hub.close()
        self._release_owned()

    # -- peers (the I/O thread) ------------------------------------------------------------

    def _check_to(self, to) -> tuple[str, ...]:
        targets = (to,) if isinstance(to, str) else tuple(to) if isinstance(
            to, (list, tuple)) else None
        if not targets:
            raise TypeError(f"to: expected a receiver address or a non-empty list of them, "
                            f"got {to!r}")
        for address in targets:
            parse_address(address)
        if len(set(targets)) != len(targets):
            raise ValueError(f"to: a receiver named twice in {list(targets)}")
        return targets

    def _peer(self, address: str) -> _Peer:
        """The receiver at ``address``, connecting if needed (lock held)."""
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address)
        if peer.link is None or not peer.link.open or peer.link.closing:  # (or ending now)
            peer.welcome = None
            peer.pushed.clear()
            peer.link = self.hub.connect(address)
            peer.link.peer = peer
        return peer

    def _on_open(self, link: Link) -> None:
        link.send(self.hello)

    def _on_message(self, link: Link, msg) -> None:
        with self._lock:
            peer = link.peer
            if peer is None or peer.link is not link:
                return  # a connection this side already replaced
            try:
                if isinstance(msg, Welcome):
                    self._on_welcome(link, peer, msg)
                elif peer.welcome is None:
                    if isinstance(msg, Refused):
                        peer.error = f"receiver {peer.address} refused this sender: " \
                                     f"{msg.reason[:300]}"
                        self._fail_peer(peer, peer.error)
                        link.close(peer.error)
                        return
                    raise ProtocolError(f"expected Welcome first, got {msg.TAG!r}")
                elif isinstance(msg, Destination):
                    self._on_destination(link, peer, msg)
                elif isinstance(msg, Verdict):
                    self._on_verdict(peer, msg)
                else:
                    raise ProtocolError(f"unexpected {msg.TAG!r} from a receiver")
            except ProtocolError as e:
                link.close(f"receiver {peer.address}: {e}")
        self._work.set()

    def _on_welcome(self, link: Link, peer: _Peer, msg: Welcome) -> None:
        if peer.welcome is not None:
            raise ProtocolError("a second Welcome")
        check_peer(self.hello, msg, f"receiver {peer.address}")
        peer.welcome, peer.error = msg, None
        for leg in list(peer.legs.values()):
            self._welcome_leg(leg)

    def _welcome_leg(self, leg: _Leg) -> None:
        """The receiver is known: find this rank's route to it and announce the request."""
        peer = leg.peer
        mine = [r for r in routes_between(self.hello, peer.welcome) if feeds(r, self.hello)]
        if not mine:
            leg.no_route = leg.ended = True
            peer.legs.pop(leg.state.rid, None)
            self._update(leg.state)
            return
        leg.route = mine[0]
        if not leg.announced:
            leg.announced = True
            leg.link = peer.link
            pushed = peer.pushed.pop(leg.state.rid, None)
            if pushed is not None:  # the receiver expected it first: no round trip
                self._accept_destination(leg, peer, pushed[0])
            else:
                leg.link.send(Announce(leg.state.rid, leg.state.num_tokens,
                                       leg.state.num_pages))

    def _on_destination(self, link: Link, peer: _Peer, dest: Destination) -> None:
        leg = peer.legs.get(dest.rid)
        if leg is None:  # pushed ahead of this rank's request: kept until it comes (or not)
            if dest.incarnation == peer.welcome.incarnation:
                peer.pushed[dest.rid] = (dest, time.monotonic() + self.timeout)
            return
        if not leg.announced or leg.link is not link:
            return  # not a request this rank announced on this connection (or it ended)
        self._accept_destination(leg, peer, dest)

    def _accept_destination(self, leg: _Leg, peer: _Peer, dest: Destination) -> None:
        """Check a destination against the request before any byte may go there."""
        reason = None
        if leg.dest is not None:
            reason = f"a second destination (use {dest.use}) for use {leg.dest.use}"
        elif dest.incarnation != peer.welcome.incarnation:
            reason = f"a destination of receiver incarnation {dest.incarnation[:16]!r}, " \
                     f"connected to {peer.welcome.incarnation!r}"
        elif route_of(dest.route) != leg.route:
            reason = f"the receiver expects route {dest.route}, this rank sends {leg.route}"
        elif dest.num_tokens != leg.state.num_tokens or dest.prefix > dest.num_tokens:
            reason = f"the receiver expects {dest.num_tokens} tokens (prefix {dest.prefix}), " \
                     f"this sender has {leg.state.num_tokens}"
        elif dest.region + self.route_format(leg.route, region_rows(
                dcp_of(peer.welcome) or DcpLayout(), dest.num_tokens, dest.prefix),
                source=True).nbytes > dest.nbytes:
            reason = f"route region {dest.region} + {dest.num_tokens} tokens overruns the " \
                     f"receiver's {dest.nbytes}-byte slot"
        if reason is not None:
            self._fail_leg(leg, f"receiver {peer.address}, request {dest.rid!r}: {reason}",
                           use=dest.use)
            return
        leg.dest, leg.welcome = dest, peer.welcome
        leg.state.cell.update(KVStatus.WaitingForInput)
        self._notify()

    def _on_verdict(self, peer: _Peer, verdict: Verdict) -> None:
        pushed = peer.pushed.get(verdict.rid)
        if pushed is not None and pushed[0].use == verdict.use:  # it ended before we had it:
            del peer.pushed[verdict.rid]  # we never wrote for it, and never will
            peer.link.send(End(verdict.rid, verdict.use, False, None))
            return
        leg = peer.legs.get(verdict.rid)
        if leg is None or (leg.dest is not None and verdict.use != leg.dest.use):
            return  # an ended leg, or another use of the id
        if leg.dest is not None and not leg.claimed and verdict.status == KVStatus.Failed:
            # A destination pushed for a use that ended before this rank's call came (an id
            # reused right after the receiver gave up on it): nothing was written under it.
            # Let it go and ask which use is current: the receiver answers with that use's
            # destination, or with its verdict if the id has none (then it fails here).
            leg.dest = None
            leg.deadline = time.monotonic() + self.timeout
            leg.link.send(End(verdict.rid, verdict.use, False, None))
            leg.link.send(Announce(verdict.rid, leg.state.num_tokens, leg.state.num_pages))
            return
        if verdict.status not in (KVStatus.Success, KVStatus.Failed) or (
                verdict.status == KVStatus.Success and not leg.finished):
            raise ProtocolError(f"verdict {verdict.status} for request {verdict.rid!r} before "
                                f"this sender finished")
        leg.verdict = (verdict.status, verdict.reason)
        self._update(leg.state)
        self._maybe_end(leg)

    def _on_close(self, link: Link, reason: str, by_peer: bool) -> None:
        with self._lock:
            peer = link.peer
            if peer is None or peer.link is not link:
                return
            peer.link, peer.welcome = None, None
            peer.pushed.clear()
            if peer.error is None or not by_peer:
                peer.error = reason
            for leg in list(peer.legs.values()):
                if leg.link is link or leg.link is None:
                    leg.ended = leg.ended or leg.link is link  # no one left to tell
                    self._fail_leg(leg, f"connection to receiver {peer.address} ended: "
                                        f"{peer.error}")
        self._work.set()

    # -- leg and request status (lock held) --------------------------------------------------

    def _fail_peer(self, peer: _Peer, reason: str) -> None:
        for leg in list(peer.legs.values()):
            self._fail_leg(leg, reason)

    def _fail_leg(self, leg: _Leg, reason: str, *, use: int | None = None) -> None:
        if leg.no_route:
            return
        if leg.terminal and leg.error is None and leg.verdict is not None:
            self._maybe_end(leg)
            return
        if leg.error is None:
            leg.error = reason
        self._update(leg.state)
        self._maybe_end(leg, use)

    def _maybe_end(self, leg: _Leg, use: int | None = None) -> None:
        """Send End once nothing of this leg is in flight and it will write no more."""
        if leg.ended or leg.writes or not leg.terminal:
            return
        leg.ended = True
        leg.peer.legs.pop(leg.state.rid, None)
        use = leg.dest.use if leg.dest is not None else use
        if use is not None and leg.link is not None and leg.link.open:
            failed = leg.error is not None and leg.verdict is None
            leg.link.send(End(leg.state.rid, use, failed, leg.error if failed else None))
        self._update(leg.state)

    def _update(self, state: _Send) -> None:
        """The request's status from its legs: Failed if any failed, Success once every leg
        with a route has the receiver's Success."""
        for leg in state.legs.values():
            if leg.error is not None:
                state.cell.fail(leg.error)
            elif leg.verdict is not None and leg.verdict[0] != KVStatus.Success:
                state.cell.fail(f"receiver {leg.peer.address} failed the request: "
                                f"{leg.verdict[1]}")
        legs = state.legs.values()
        if all(leg.no_route or (leg.verdict is not None and leg.verdict[0] == KVStatus.Success
                                and leg.ended) for leg in legs):
            state.cell.update(KVStatus.Success)
        elif any(leg.dest is not None for leg in legs):
            state.cell.update(KVStatus.Transferring)
        self._notify()

    def _live(self, leg: _Leg) -> None:
        """Raise _Stopped unless this leg may write now (the fence; lock held)."""
        if self._closed:
            self._fail_leg(leg, "the sender was closed")
        if leg.terminal or leg.dest is None or leg.link is None or not leg.link.open:
            raise _Stopped()

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        """Jobs run in order; a job whose legs wait for a destination (or a Welcome) is
        parked, and later calls of its request wait behind it, while other requests go
        ahead, so a request the receiver has not expected never holds up the others."""
        if self.cache.device.type == "cuda":
            torch.cuda.set_device(self.cache.device)
        while True:
            self._work.wait(self._next_check())
            self._work.clear()
            with self._lock:
                closing = self._closed
                now = time.monotonic()
                self._expire(now)
                if closing:
                    for job in self._jobs:
                        job.state.jobs -= 1
                        for leg in job.state.legs.values():
                            self._fail_leg(leg, "the sender was closed")
                    self._jobs.clear()
                    return
                self._close_idle(now)
                runnable, blocked = [], set()
                for job in self._jobs:
                    if id(job.state) in blocked or not self._resolved(job.state):
                        blocked.add(id(job.state))
                    else:
                        runnable.append(job)
                for job in runnable:
                    self._jobs.remove(job)
                    for leg in job.state.legs.values():
                        leg.claimed = True
            for job in runnable:
                self._do(job)

    def _next_check(self) -> float:
        """Seconds until the next deadline or idle connection (at most 1)."""
        with self._lock:
            now, soon = time.monotonic(), 1.0
            for peer in self._peers.values():
                for leg in peer.legs.values():
                    soon = min(soon, leg.deadline - now)
            return max(soon, 0.001)

    def _resolved(self, state: _Send) -> bool:
        return all(leg.terminal or leg.dest is not None for leg in state.legs.values())

    def _expire(self, now: float) -> None:
        for peer in self._peers.values():
            for rid, (dest, deadline) in list(peer.pushed.items()):
                if now > deadline:  # never sent here: release the receiver's slot
                    del peer.pushed[rid]
                    if peer.link is not None and peer.link.open:
                        peer.link.send(End(rid, dest.use, True, "this sender never had the "
                                                                 "request"))
            for leg in list(peer.legs.values()):
                if leg.terminal or now <= leg.deadline:
                    continue
                if leg.dest is None:
                    why = peer.error or "no destination"
                    self._fail_leg(leg, f"request {leg.state.rid!r}: no destination from "
                                        f"receiver {peer.address} within {self.timeout} s"
                                        f" ({why})")
                elif leg.finished:
                    self._fail_leg(leg, f"no verdict from receiver {peer.address} within "
                                        f"{self.timeout} s of the last segment")

    def _close_idle(self, now: float) -> None:
        for address, peer in list(self._peers.items()):
            if not peer.legs and not peer.pushed and now - peer.used_at > self.idle:
                if peer.link is not None:
                    peer.link.peer = None  # its close is not news to anyone
                    peer.link.close("idle")
                del self._peers[address]

    def _do(self, job: _Job) -> None:
        state = job.state
        try:
            for leg in state.legs.values():
                with self._lock:
                    if leg.terminal:
                        continue
                    leg.peer.used_at = time.monotonic()
                try:
                    self._ship(leg, job)
                except _Stopped:
                    pass
                except Exception as e:  # any failure fails this leg, never the sender
                    with self._lock:
                        self._fail_leg(leg, f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                state.jobs -= 1

    def _selection(self, leg: _Leg, job: _Job):
        """This rank's part of the job's chunk for the leg's receiver: its share (pages of
        this pool, and request tokens), the tokens of it the receiver takes (past its prefix,
        of its DCP share: `protocol.segment_rows`) and their first row in the route region."""
        state, n, ps = job.state, job.state.num_tokens, self.cache.page_size
        if self.dcp is None:
            share = chunk_share(state.num_pages, self.sizes.cp, self.rank.cp, *job.chunk,
                                policy=self.policy, request_id=request_key(state.rid))
            tokens = (min(share.start * ps, n), min(share.stop * ps, n))
        else:  # a DCP-sharded pool sends every token it holds, in one call
            share, tokens = range(state.num_pages), (0, n)
        sel, row = segment_rows(dcp_of(leg.welcome) or DcpLayout(), self.dcp, tokens, n,
                                leg.dest.prefix)
        return share, tokens, sel, row

    def _ship(self, leg: _Leg, job: _Job) -> None:
        """Ship this leg's new layers of the job's chunk (worker thread)."""
        state, route = job.state, leg.route
        share, tokens, sel, row = self._selection(leg, job)
        rows = (row, row + sel.count)
        n_layers = len(route.src_layers)
        a = leg.sent.get(job.chunk, 0)
        b = min(max(job.upto - route.src_layers.start, 0), n_layers)
        fmt = self.route_format(route, region_rows(sel.dst, state.num_tokens, leg.dest.prefix),
                                source=True)
        per_layer = sel.count * fmt.layer_row_nbytes
        if job.metadata:
            leg.metadata = job.metadata  # goes with the next note of this leg
        base = dict(pages=(share.start, share.stop), tokens=tokens)
        if not sel.count or b <= a or not (
                job.last or b == n_layers or (b - a) * per_layer >= self.coalesce):
            if job.last:  # nothing (new) of ours, but the receiver must hear we are done
                self._queue_note(leg, None, None, dict(base, layers=(b, b), nbytes=0,
                                                       mode=leg.mode or "packed", last=True))
            return  # else coalesce: these layers go with a later call
        dest = leg.dest
        plain = sel.src is None and sel.dst.size == 1 and dest.prefix == 0  # whole share
        mode = leg.mode = self._choose_mode(leg, job.page_ids, share, sel, plain)
        if mode == "direct":
            part = dataclasses.replace(
                route, src_layers=route.src_layers[a:b],
                dst_layers=range(route.dst_layers.start + a, route.dst_layers.start + b))
            w = leg.welcome
            pairs = None if plain else list(zip(sel.src_positions(), sel.dst_positions(),
                                                strict=True))
            segments = direct_segments(self.cache, job.page_ids, w.pool, w.num_heads,
                                       dest.page_ids, share, range(*tokens), part, pairs)
            if job.event is not None:
                job.event.synchronize()  # the engine reads the pool: the runner's writes first
            self._submit(leg, segments, None, None,
                         dict(base, layers=(a, b), nbytes=sum(s[2] for s in segments),
                              mode=mode, last=job.last))
            leg.sent[job.chunk] = b
            return
        if job.event is not None:  # pack after the runner's writes, without blocking the host
            torch.cuda.current_stream(self.cache.device).wait_event(job.event)
        if sel.src is None:  # the receiver's tokens of the share are consecutive here...
            place = dict(token_offset=sel.start, num_tokens=sel.count) if sel.dst.size == 1 \
                else dict(tokens=sel.tensors(self.cache.device)[0])  # ...or every D-th
        else:
            place = dict(tokens=sel.tensors(self.cache.device)[0])
        integrity = leg.welcome.integrity
        groups = layer_groups(range(a, b), per_layer, group_bytes((b - a) * per_layer))
        for group in groups:
            g0, g1 = group.start, group.stop
            offset, nbytes = SlotPlan.segment(dest.region, fmt, rows, (g0, g1))
            slot = self.arena.alloc(nbytes, timeout=self.timeout)
            submitted = False
            try:
                t0 = time.perf_counter()
                digest = new_digest(self.cache.device) if integrity == "digest" else None
                pack_pages(self.cache, job.page_ids, heads=route.src_heads,
                           layers=(route.src_layers.start + g0, route.src_layers.start + g1),
                           out=slot.tensor, digest=digest, validate=False, **place)
                if slot.tensor.is_cuda:  # the engine reads the bytes: the pack must be done
                    torch.cuda.current_stream(slot.tensor.device).synchronize()
                check = checksum(slot.tensor) if integrity == "crc32c" else \
                    None if digest is None else digest_value(digest)
                if self.trace is not None:
                    self.trace.append(("pack", state.rid, g0, g1, t0, time.perf_counter()))
                self._submit(leg, [(slot.tensor.data_ptr(), dest.addr + offset, nbytes)],
                             slot, check, dict(base, layers=(g0, g1), nbytes=nbytes,
                                               mode="packed", last=job.last and g1 == b))
                submitted = True  # the landing thread releases the slot once it landed
            finally:
                if not submitted:
                    slot.release()
        leg.sent[job.chunk] = b

    def _submit(self, leg: _Leg, segments, slot, check, note: dict) -> None:
        """The fence, then the write: submitted only while the leg is live (counted in
        ``writes`` first, so no End is sent while it may still land); its landing is waited
        for, in order, by the landing thread, which notifies."""
        with self._lock:
            self._live(leg)
            leg.writes += 1
            leg.state.cell.update(KVStatus.Transferring)
        submitted = time.perf_counter()  # the trace's wire span (a small write may go in submit)
        try:
            pending = self.engine.submit(leg.welcome.session, segments)
        except BaseException:
            with self._lock:  # nothing of it is on the wire (submit drains a failed batch)
                leg.writes -= 1
                self._maybe_end(leg)
            raise
        self._landing.put((leg, pending, slot, check, note, submitted))

    def _queue_note(self, leg: _Leg, slot, check, note: dict) -> None:
        """A note with no write of its own, sent after the leg's earlier writes landed."""
        with self._lock:
            self._live(leg)
            leg.writes += 1
        self._landing.put((leg, None, slot, check, note, time.perf_counter()))

    def _land_loop(self) -> None:
        while True:
            item = self._landing.get()
            if item is None:
                return
            leg, pending, slot, check, note, t1 = item
            error = None
            try:
                if pending is not None:
                    self.engine.wait(pending)
            except Exception as e:  # fails this leg, never the sender
                error = f"{type(e).__name__}: {e}"
            finally:
                if slot is not None:
                    slot.release()  # before any status change: a caller may look at the arena
            if self.trace is not None and pending is not None:
                self.trace.append(("wire", leg.state.rid, *note["layers"], t1,
                                   time.perf_counter()))
            with self._lock:
                leg.writes -= 1
                if error is not None:
                    self._fail_leg(leg, error)
                elif not leg.terminal and leg.link is not None and leg.link.open:
                    meta = leg.metadata
                    leg.metadata = None
                    leg.link.send(Note(leg.state.rid, leg.dest.use, note["pages"],
                                       note["tokens"], note["layers"], note["nbytes"],
                                       note["mode"], note["last"], check,
                                       base64.b64encode(meta).decode() if meta else None))
                    if note["last"]:
                        leg.finished = True
                        leg.deadline = time.monotonic() + self.timeout
                self._maybe_end(leg)
            self._work.set()

    def _choose_mode(self, leg: _Leg, page_ids, pages: range, sel, plain: bool) -> str:
        if self.mode == "packed":
            return "packed"
        w = leg.welcome
        allowed = w.pool is not None and w.layout == self.cache.layout and \
            w.page_size == self.cache.page_size
        if self.mode == "direct":
            if not allowed:
                raise ValueError("direct mode: the receiver does not accept direct writes "
                                 "(start it with direct=True, same layout and page size)")
            return "direct"
        if not allowed or not sel.count:
            return "packed"
        dst = leg.dest.page_ids
        blocks = len(leg.route.src_layers) * len(self.cache.components)
        full = plain and whole_pages(self.cache.num_heads, w.num_heads, leg.route)
        descriptors = direct_descriptors(page_ids[pages.start:pages.stop],
                                         dst[pages.start:pages.stop], sel.count, blocks, full)
        return self.cost.choose(descriptors, self.route_format(leg.route, sel.count,
                                                               source=True).nbytes)
