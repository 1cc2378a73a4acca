"""KVSender: a prefill rank that ships its share of a request's pages to one decode rank.

Per send (one prefill chunk): wait for the receiver's destination, intersect the chunk with this
rank's page share under the sender policy, then either

* packed: pack the share (the route's heads and layers) into a local staging slot, layer group
  by layer group, writing each group while packing the next, to
  ``dest + region(route) + token_start * bytes_per_token`` (the packed format is linear in
  tokens, so CP shares tile the route's region without coordination); or
* direct: one descriptor per contiguous page run (or per token, for a head slice) straight
  into the receiver's pool, where the receiver allows it;

then notify. A rank whose share is empty still notifies (zero bytes), so the receiver can count
every expected sender. Sends run on a background thread; ``poll`` never blocks.

Fencing: the destination names the request's *use* (one ``expect`` of one receiver
incarnation); before every write the sender checks that use's verdict and stops if the receiver
has already ended it; after its last chunk it waits for the verdict, ends in the same status and
acknowledges it (the receiver keeps a failed request's slot until every sender that might still
write has acknowledged, or a grace period has passed). The sender id is claimed with this
sender's incarnation and kept alive by a heartbeat, so a restarted sender with the same
coordinates takes over a dead one's id, and `close` releases it.
"""

from __future__ import annotations

import base64
import queue
import threading
import time
import uuid

import torch

from .._checks import as_page_ids, check_num_tokens
from ..cp.partition import SenderPolicy, senders_for
from ..kernels import pack_pages
from ..parallel import ParallelRank
from ..staging import StagingArena
from .control import ControlError, ControlPlane, ControlTimeout, check_geometry
from .direct import direct_descriptors, direct_segments, whole_pages
from .endpoint import Endpoint, check_ready
from .engine import TransferEngine
from .mapping import Route
from .policy import CostModel
from .status import KVStatus, StatusCell

__all__ = ["KVSender", "checksum"]

PIPELINE_CHUNK_BYTES = 16 << 20  # layer groups of at least this size are packed and written in turn
MODES = ("packed", "direct", "auto")


def layer_groups(num_layers: int, segment_nbytes: int) -> list[range]:
    """How a packed segment is cut for pipelining: consecutive layer ranges of at least
    PIPELINE_CHUNK_BYTES (or one layer). Their count is the descriptors a packed send uses."""
    per_layer = max(1, segment_nbytes // num_layers)
    step = max(1, -(-PIPELINE_CHUNK_BYTES // per_layer))
    return [range(l0, min(l0 + step, num_layers)) for l0 in range(0, num_layers, step)]


def checksum(buf: torch.Tensor, value: int = 0) -> int:
    """CRC32C of a contiguous uint8 buffer, continuing from ``value`` (chunks chain). On a CUDA
    buffer the bytes are copied to the host first (a synchronisation): checksums are opt-in."""
    try:
        import crc32c
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("checksums need the crc32c package: pip install 'cpkv[integrity]'"
                          ) from e
    host = buf.cpu() if buf.is_cuda else buf
    return crc32c.crc32c(memoryview(host.numpy()), value=value)


class _Stopped(Exception):
    """The receiver ended the request: stop writing, acknowledge."""


class _Send:
    """One request on this sender: what the user sees (cell) and what the fence needs."""

    def __init__(self, deadline: float):
        self.cell = StatusCell()
        self.deadline = deadline  # for the destination; then for the verdict
        self.recv = self.dest = None
        self.note_key = self.verdict_key = None
        self.lines = 0  # notification lines appended
        self.finished = False  # last chunk written and notified
        self.ended = False  # end line appended (or nothing left to say)
        self.busy = False  # the worker is sending a chunk of it
        self.checked = False  # destination checked against the request
        self.error = None  # why the destination could not be had
        self.next_try, self.backoff = 0.0, 0.0005  # polling the destination
        self.mode = None


class KVSender(Endpoint):
    """Sends this prefill rank's pages of each request to one decode receiver.

    Args:
        cache: this rank's pool (after the CP all-gather it holds the whole sequence).
        control: the receiver's control plane.
        rank: this rank's (dp, cp, tp, pp); its key is its sender id.
        cp_size: CP ranks sending the same route (all of them notify).
        policy: "all" (disjoint page shares), "rank0", or "rotate" (one rank per request).
        route: the heads and layers this rank sends to this receiver (`map_ranks`); default
            every head and layer.
        mode: "packed", "direct" (needs a receiver that allows it) or "auto" (the cost model
            picks per request; packed where direct is not allowed).
        cost: the cost model for "auto" (default: `CostModel.load()`).
        engine, arena: shared ones, or None to create (and own) them.
        timeout: seconds to wait for a request's destination, for staging space and for the
            receiver's verdict after the last chunk.
        lease: seconds without a heartbeat after which this sender id counts as dead and a new
            sender with the same coordinates may take it over (a live one is refused).

    Use as a context manager (``with KVSender(...) as s:``) or call `close`.
    """

    def __init__(self, cache, control: ControlPlane, *, rank: ParallelRank | None = None,
                 cp_size: int = 1, policy: SenderPolicy | str = "all",
                 route: Route | None = None, mode: str = "packed",
                 cost: CostModel | None = None, engine: TransferEngine | None = None,
                 arena: StagingArena | None = None, arena_bytes: int = 64 << 20,
                 timeout: float = 30.0, lease: float = 2.0):
        self.rank = rank or ParallelRank()
        if not isinstance(self.rank, ParallelRank):
            raise TypeError(f"rank: expected a ParallelRank, got {type(rank).__name__}")
        if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
            raise ValueError(f"cp_size: expected a positive int, got {cp_size!r}")
        if not 0 <= self.rank.cp < cp_size:
            raise ValueError(f"rank.cp: expected a value in [0, {cp_size}), got {self.rank.cp}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if not isinstance(lease, (int, float)) or lease <= 0:
            raise ValueError(f"lease: expected a positive number of seconds, got {lease!r}")
        self.route = route or Route.whole(cache.num_heads, cache.num_layers, self.rank.tp,
                                          self.rank.pp)
        if (self.route.src_heads.stop > cache.num_heads
                or self.route.src_layers.stop > cache.num_layers):
            raise ValueError(f"route: heads {self.route.src_heads} / layers "
                             f"{self.route.src_layers} exceed this pool's {cache.num_heads} "
                             f"heads / {cache.num_layers} layers")
        self.cp_size, self.policy, self.mode = cp_size, SenderPolicy(policy), mode
        self.cost = cost if cost is not None or mode != "auto" else CostModel.load()
        self.lease = float(lease)
        self.incarnation = uuid.uuid4().hex[:16]
        self._claimed = False
        self._closing = threading.Event()
        super().__init__(cache, control, engine, arena, arena_bytes, timeout)
        try:
            self.bytes_per_token = self.route_bytes_per_token(self.route)
            if mode != "packed":
                self.register_pool()
            self._reg = control.key("reg", self.rank.key)
            self._claim()
            control.put(self._reg, {"inc": self.incarnation, "session": self.engine.session_id,
                                    "geometry": self.geometry, "lease": self.lease})
        except BaseException:
            self._unclaim()
            self._release_owned()
            raise
        self._receiver, self._receiver_read_at = None, 0.0
        self._states: dict[int, _Send] = {}
        self._watch: list[_Send] = []  # finished, awaiting the verdict
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"cpkv-beat-{self.rank.key}")
        self._worker = threading.Thread(target=self._run, name=f"cpkv-sender-{self.rank.key}",
                                        daemon=True)
        self._beat.start()
        self._worker.start()

    # -- public ----------------------------------------------------------------------------

    def send(self, request_id: int, page_ids: torch.Tensor, *, num_tokens: int | None = None,
             chunk: tuple[int, int] | None = None, last: bool = True,
             metadata: bytes | None = None, ready=None) -> None:
        """Queue one chunk of a request (non-blocking). Poll its status with `poll`.

        Args:
            request_id: the request (non-negative int, shared with the receiver).
            page_ids: [n_pages] this pool's page ids of the whole request, in request order.
            num_tokens: tokens of the whole request (default: every slot of its pages).
            chunk: request-local pages [start, stop) of this prefill chunk (default: all).
            last: whether this is the request's last chunk; decide it before filtering by
                share, so every rank agrees (a rank with an empty share still sends it).
            metadata: a small blob (e.g. the first output token) carried with the last chunk.
            ready: the runner's ``torch.cuda.Stream`` (an event is recorded on it now) or a
                ``torch.cuda.Event`` after which the KV is written; the worker orders its pack
                after it, and waits for it before a direct write. CUDA pools only.

        Everything is checked here, before anything is queued; the worker trusts it.
        """
        if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id < 0:
            raise ValueError(f"request_id: expected a non-negative int, got {request_id!r}")
        page_ids = as_page_ids(page_ids, self.cache.num_pages, self.cache.device)
        num_tokens = check_num_tokens(num_tokens, page_ids.numel(), self.cache.page_size)
        n_pages = page_ids.numel()
        if chunk is not None and (not isinstance(chunk, (tuple, list)) or len(chunk) != 2 or
                                  not all(isinstance(v, int) and not isinstance(v, bool)
                                          for v in chunk)):
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
        if self._closing.is_set():
            raise RuntimeError("send: the sender is closed")
        with self._lock:
            state = self._states.get(request_id)
            if state is None:
                state = self._states[request_id] = _Send(time.monotonic() + self.timeout)
        self._jobs.put((request_id, page_ids, num_tokens, (start, stop), last, metadata, event,
                        state))

    def poll(self, request_id: int) -> KVStatus:
        """This rank's status for the request (non-blocking). After the last chunk it is
        Transferring until the receiver's verdict arrives, then the receiver's status."""
        state = self._states.get(request_id)
        if state is None:
            return KVStatus.Bootstrapping
        if not state.ended:
            self._check_verdict(state)
        return state.cell.status

    def reason(self, request_id: int) -> str | None:
        state = self._states.get(request_id)
        return state.cell.reason if state else None

    def mode_of(self, request_id: int) -> str | None:
        """The mode ("packed" or "direct") this rank's last send of the request used."""
        state = self._states.get(request_id)
        return state.mode if state else None

    def forget(self, request_id: int) -> None:
        """Drop a request's state (safe at any time: work in flight finishes in the
        background and still acknowledges the receiver's verdict)."""
        with self._lock:
            self._states.pop(request_id, None)

    def close(self) -> None:
        """Stop the worker (pending sends fail), tell the receiver of requests left open,
        release the sender id and owned engine and arena. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._jobs.put(None)
        self._worker.join(timeout=self.timeout + 5)
        self._beat.join(timeout=5)
        with self._lock:
            open_states = [s for s in self._watch if not s.ended]
            self._watch = []
        for state in open_states:  # the worker has stopped: nothing of ours is in flight
            state.cell.fail("the sender was closed")
            self._end(state, "fail", "the sender was closed")
        self._unclaim()
        self._release_owned()

    # -- sender id -------------------------------------------------------------------------

    def _claim(self) -> None:
        """Take the sender id: free, or held by an incarnation whose heartbeat stopped."""
        store, owner = self.control.store, self._reg + "/owner"
        current = store.compare_set(owner, "", self.incarnation).decode()
        if current != self.incarnation:
            beat = self._reg + "/beat"
            before = store.add(beat, 0)
            try:  # wait out the holder's lease (it beats four times per lease)
                lease = float(self.control.get_or_none(self._reg)["lease"])
            except Exception:
                lease = self.lease
            time.sleep(min(max(lease, self.lease), 60.0))
            if store.add(beat, 0) != before:
                raise ValueError(f"duplicate sender id: {self.rank} is already registered "
                                 f"(incarnation {current}, alive)")
            if store.compare_set(owner, current, self.incarnation).decode() != self.incarnation:
                raise ValueError(f"duplicate sender id: {self.rank} was taken over meanwhile")
        self._claimed = True
        store.add(self._reg + "/beat", 1)

    def _unclaim(self) -> None:
        if not self._claimed:
            return
        self._claimed = False
        try:
            store, owner = self.control.store, self._reg + "/owner"
            if store.compare_set(owner, self.incarnation, "").decode() == "":
                self.control.delete(self._reg, owner, self._reg + "/beat")
        except Exception:
            pass  # the control plane may be gone; the claim then dies with it

    def _heartbeat(self) -> None:
        while not self._closing.wait(self.lease / 4):
            try:
                self.control.store.add(self._reg + "/beat", 1)
            except Exception:
                pass  # the store may be briefly unreachable; the lease tolerates gaps

    # -- worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        """Jobs wait in order; a job whose destination is not published yet is parked (later
        chunks of its request wait behind it) while other requests go ahead, so a request the
        receiver has not expected (or already ended) never holds up the others."""
        if self.cache.device.type == "cuda":
            torch.cuda.set_device(self.cache.device)
        parked: list = []
        while True:
            try:
                job = self._jobs.get(timeout=0.001 if self._watch or parked else 0.05)
            except queue.Empty:
                job = False
            if job is None:
                break
            if job is not False:
                parked.append(job)
            blocked, waiting = set(), []
            for job in parked:
                state = job[-1]
                if id(state) in blocked or not self._dest_ready(job[0], state):
                    blocked.add(id(state))
                    waiting.append(job)
                else:
                    self._do(job)
            parked = waiting
            for state in list(self._watch):
                self._check_verdict(state)
        while True:  # closing: fail what is still parked or queued
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                parked.append(job)
        for job in parked:
            job[-1].cell.fail("the sender was closed")
            self._end(job[-1], "fail", "the sender was closed")

    def _dest_ready(self, rid: int, state: _Send) -> bool:
        """Whether the job can run now: its destination is known, or it is to fail (closed,
        no destination by the deadline, a bad one). Polls the store with a backoff."""
        if state.dest is not None or state.cell.done or self._closing.is_set():
            return True
        now = time.monotonic()
        if now < state.next_try:
            return False
        try:
            found = self._find_dest(rid, now)
        except Exception as e:
            state.error = e
            return True
        if found is not None:
            recv, dest = found
            if isinstance(dest, dict) and isinstance(dest.get("use"), int):
                use = self.control.key(recv["inc"], "use", dest["use"])
                state.note_key = f"{use}/note/{self.rank.key}"  # to say why, if we refuse
                state.verdict_key = f"{use}/verdict"
            state.recv, state.dest = recv, dest
            if isinstance(dest, dict) and isinstance(dest.get("ended"), dict):
                state.error = _Stopped(f"the receiver already ended request {rid}: "
                                       f"{dest['ended'].get('reason')}")
            return True
        if now > state.deadline:
            state.error = ControlTimeout(f"request {rid}: no destination from the receiver "
                                         f"within {self.timeout} s")
            return True
        state.backoff = min(state.backoff * 2, 0.01)
        state.next_try = now + state.backoff
        return False

    def _do(self, job) -> None:
        state = job[-1]
        if self._closing.is_set():
            state.cell.fail("the sender was closed")
        with self._lock:
            skip = state.cell.done or state.ended
            state.busy = not skip
        if skip:
            self._end(state, "ack")  # a verdict came between chunks: stop here, say so
            return
        try:
            self._send_chunk(*job)
        except _Stopped as e:
            state.cell.fail(str(e))
            self._end(state, "ack", busy_ok=True)
        except Exception as e:  # any failure fails this request, never the sender
            state.cell.fail(f"{type(e).__name__}: {e}")
            self._end(state, "fail", state.cell.reason, busy_ok=True)
        finally:
            state.busy = False

    def _end(self, state: _Send, kind: str, reason: str | None = None, *,
             busy_ok: bool = False) -> bool:
        """Append this sender's last line for the request: it writes nothing more. Only the
        worker may end a request it is sending (``busy_ok``): its writes must be over."""
        with self._lock:
            if state.ended or (state.busy and not busy_ok):
                return False
            state.ended = True
            if state in self._watch:
                self._watch.remove(state)
        if state.note_key is None:
            return  # it never learnt the request's use, so it never wrote a byte
        try:
            self.control.append(state.note_key, {"end": kind, "reason": reason}, state.lines)
            state.lines += 1
        except Exception:
            pass  # the control plane may be gone; the receiver's grace period covers it
        return True

    def _check_verdict(self, state: _Send) -> None:
        """Read the receiver's verdict: end in the same status and acknowledge it (unless the
        worker is mid-chunk: it acknowledges itself); a finished request without a verdict by
        its deadline fails."""
        if state.ended or state.verdict_key is None:
            return
        try:
            verdict = self.control.get_or_none(state.verdict_key)
            if verdict is None:
                if state.finished and time.monotonic() > state.deadline:
                    state.cell.fail(f"no verdict from the receiver within {self.timeout} s "
                                    f"of the last chunk")
                    self._end(state, "fail", state.cell.reason)
                return
            if not isinstance(verdict, dict) or verdict.get("status") not in (0, 4):
                raise ControlError(f"malformed verdict {str(verdict)[:80]}")
        except Exception as e:
            state.cell.fail(f"receiver verdict unreadable: {type(e).__name__}: {e}")
            self._end(state, "fail", state.cell.reason)
            return
        if verdict["status"] == KVStatus.Success:
            state.cell.update(KVStatus.Success)
        else:
            state.cell.fail(f"receiver failed the request: {verdict.get('reason')}")
        self._end(state, "ack")

    def _check_open(self, state: _Send) -> None:
        """Raise _Stopped if the receiver already ended this use (checked before each write)."""
        if self._closing.is_set():
            raise RuntimeError("the sender was closed")
        verdict = self.control.get_or_none(state.verdict_key)
        if verdict is not None:
            reason = verdict.get("reason") if isinstance(verdict, dict) else verdict
            raise _Stopped(f"receiver failed the request: {reason}")

    def _receiver_info(self) -> dict | None:
        info = self.control.get_or_none(self.control.key("recv"))
        if info is None:
            return None
        if not isinstance(info, dict) or not isinstance(info.get("inc"), str) or \
                not isinstance(info.get("session"), str):
            raise ControlError(f"malformed receiver registration {str(info)[:80]}")
        if self._receiver is None or self._receiver["inc"] != info["inc"]:
            check_geometry(self.geometry, info.get("geometry"), "the receiver")
            self._receiver = info
        return self._receiver

    def _find_dest(self, rid: int, now: float) -> tuple[dict, dict] | None:
        """The current receiver incarnation's destination for ``rid``, or None yet (a receiver
        that restarts is followed: its registration is re-read every quarter second)."""
        if self._receiver is None or now - self._receiver_read_at > 0.25:
            self._receiver_read_at = now
            self._receiver_info()
        if self._receiver is None:
            return None
        dest = self.control.get_or_none(self.control.key(self._receiver["inc"], "dest", rid))
        return None if dest is None else (self._receiver, dest)

    def _check_dest(self, rid: int, dest, page_ids: torch.Tensor, num_tokens: int) -> None:
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not isinstance(dest, dict) or not all(whole(dest.get(f)) for f in (
                "use", "addr", "nbytes", "num_tokens", "num_pages")) or \
                not isinstance(dest.get("regions"), dict):
            raise ControlError(f"request {rid}: malformed destination {str(dest)[:120]}")
        if dest["num_tokens"] != num_tokens or dest["num_pages"] != page_ids.numel():
            raise ValueError(f"request {rid}: the receiver expects {dest['num_tokens']} tokens in "
                             f"{dest['num_pages']} pages, this sender has {num_tokens} in "
                             f"{page_ids.numel()}")
        region = dest["regions"].get(self.route.key)
        if region is None:
            raise ValueError(f"request {rid}: the receiver expects no route {self.route.key}")
        if not whole(region) or region + num_tokens * self.bytes_per_token > dest["nbytes"]:
            raise ControlError(f"request {rid}: route region {region} + {num_tokens} tokens "
                               f"overruns the receiver's {dest['nbytes']}-byte slot")

    def _send_chunk(self, rid, page_ids, num_tokens, chunk, last, metadata, event,
                    state) -> None:
        if state.error is not None:
            raise state.error
        recv, dest = state.recv, state.dest
        if not state.checked:
            self._check_dest(rid, dest, page_ids, num_tokens)
            state.checked = True
        state.cell.update(KVStatus.Transferring)
        share = senders_for(self.policy, page_ids.numel(), self.cp_size, self.rank.cp, rid)
        p0 = max(share.start, chunk[0])
        p1 = max(p0, min(share.stop, chunk[1]))
        ps = self.cache.page_size
        pages, tokens = range(p0, p1), range(min(p0 * ps, num_tokens), min(p1 * ps, num_tokens))
        mode = state.mode = self._choose_mode(recv, dest, page_ids, pages, tokens)
        crc = None
        if mode == "direct" and len(tokens):
            segments = direct_segments(self.cache, page_ids, recv["pool"],
                                       recv["geometry"]["num_heads"], dest["page_ids"], pages,
                                       tokens, self.route)
            if event is not None:
                event.synchronize()  # the engine reads the pool: the runner's writes first
            self._check_open(state)
            self.engine.write(recv["session"], segments)
            nbytes = sum(s[2] for s in segments)
        else:
            nbytes = len(tokens) * self.bytes_per_token
            if nbytes:
                with self.arena.alloc(nbytes, timeout=self.timeout) as slot:
                    crc = self._pack_and_write(
                        state, page_ids[p0:p1], len(tokens), slot.tensor, recv["session"],
                        dest["addr"] + dest["regions"][self.route.key]
                        + tokens.start * self.bytes_per_token, event,
                        bool(recv.get("checksum")))
        note = {"pages": [p0, p1], "tokens": [tokens.start, tokens.stop], "nbytes": nbytes,
                "mode": mode, "last": last, "crc": crc,
                "metadata": base64.b64encode(metadata).decode() if metadata else None}
        self.control.append(state.note_key, note, state.lines)
        state.lines += 1
        if last:
            with self._lock:
                state.finished = True
                state.deadline = time.monotonic() + self.timeout
                self._watch.append(state)

    def _choose_mode(self, recv, dest, page_ids, pages, tokens) -> str:
        if self.mode == "packed":
            return "packed"
        allowed = recv.get("pool") is not None and recv["geometry"]["layout"] == self.cache.layout
        if self.mode == "direct":
            if not allowed:
                raise ValueError("direct mode: the receiver does not accept direct writes "
                                 "(start it with direct=True, same layout and page size)")
            return "direct"
        if not allowed or not len(tokens):
            return "packed"
        descriptors = direct_descriptors(
            page_ids[pages.start:pages.stop], dest["page_ids"][pages.start:pages.stop],
            len(tokens), len(self.route.src_layers) * len(self.cache.components),
            whole_pages(self.cache.num_heads, recv["geometry"]["num_heads"], self.route))
        return self.cost.choose(descriptors, len(tokens) * self.bytes_per_token)

    def _pack_and_write(self, state, ids, n, staging, peer, dest_addr, event,
                        with_crc) -> int | None:
        """Pack and write a segment of n tokens layer group by layer group, packing group g+1
        while group g is on the wire (the segment is layer-major: group [l0, l1) of the route is
        bytes [l0, l1) x n x row_bytes of it, on both sides). Returns the segment's CRC32C when
        asked. Before each write the use is checked to be still open."""
        layers, heads = self.route.src_layers, self.route.src_heads
        per_layer = n * self.bytes_per_token // len(layers)
        pending, crc = [], 0
        if event is not None:  # pack after the runner's writes, without blocking the host
            torch.cuda.current_stream(staging.device).wait_event(event)
        try:
            for group in layer_groups(len(layers), n * self.bytes_per_token):
                l0, l1 = group.start, group.stop
                part = staging[l0 * per_layer:l1 * per_layer]
                pack_pages(self.cache, ids, num_tokens=n, heads=heads,
                           layers=(layers.start + l0, layers.start + l1), out=part,
                           validate=False)
                if part.is_cuda:  # the engine reads the bytes: the pack must have finished
                    torch.cuda.current_stream(part.device).record_event().synchronize()
                if with_crc:
                    crc = checksum(part, crc)
                self._check_open(state)
                pending.append(self.engine.submit(peer, [(part.data_ptr(),
                                                          dest_addr + l0 * per_layer,
                                                          part.numel())]))
        finally:
            self.engine.wait(*pending)  # never release a slot the engine still reads
        return crc if with_crc else None
