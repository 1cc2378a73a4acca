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
"""

from __future__ import annotations

import base64
import queue
import threading

import torch

from .._checks import as_page_ids, check_num_tokens
from ..cp.partition import SenderPolicy, senders_for
from ..kernels import pack_pages
from ..staging import StagingArena
from .control import ControlPlane, ParallelRank, check_geometry
from .direct import direct_descriptors, direct_segments, whole_pages
from .endpoint import Endpoint
from .engine import TransferEngine
from .mapping import Route
from .policy import CostModel
from .status import KVStatus, StatusCell

__all__ = ["KVSender"]

PIPELINE_CHUNK_BYTES = 16 << 20  # layer groups of at least this size are packed and written in turn
MODES = ("packed", "direct", "auto")


def layer_groups(num_layers: int, segment_nbytes: int) -> list[range]:
    """How a packed segment is cut for pipelining: consecutive layer ranges of at least
    PIPELINE_CHUNK_BYTES (or one layer). Their count is the descriptors a packed send uses."""
    per_layer = max(1, segment_nbytes // num_layers)
    step = max(1, -(-PIPELINE_CHUNK_BYTES // per_layer))
    return [range(l0, min(l0 + step, num_layers)) for l0 in range(0, num_layers, step)]


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
        timeout: seconds to wait for a request's destination and for staging space (the
            receiver's registration waits for the control plane's own timeout).
    """

    def __init__(self, cache, control: ControlPlane, *, rank: ParallelRank | None = None,
                 cp_size: int = 1, policy: SenderPolicy | str = "all",
                 route: Route | None = None, mode: str = "packed",
                 cost: CostModel | None = None, engine: TransferEngine | None = None,
                 arena: StagingArena | None = None, arena_bytes: int = 64 << 20,
                 timeout: float = 30.0):
        self.rank = rank or ParallelRank()
        if not 0 <= self.rank.cp < cp_size:
            raise ValueError(f"rank.cp: expected a value in [0, {cp_size}), got {self.rank.cp}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.route = route or Route.whole(cache.num_heads, cache.num_layers, self.rank.tp,
                                          self.rank.pp)
        if (self.route.src_heads.stop > cache.num_heads
                or self.route.src_layers.stop > cache.num_layers):
            raise ValueError(f"route: heads {self.route.src_heads} / layers "
                             f"{self.route.src_layers} exceed this pool's {cache.num_heads} "
                             f"heads / {cache.num_layers} layers")
        self.cp_size, self.policy, self.mode = cp_size, SenderPolicy(policy), mode
        self.cost = cost if cost is not None or mode != "auto" else CostModel.load()
        super().__init__(cache, control, engine, arena, arena_bytes, timeout)
        self.bytes_per_token = self.route_bytes_per_token(self.route)
        if mode != "packed":
            self.register_pool()
        reg = control.key("reg", self.rank.key)
        if control.store.add(reg + "/claims", 1) != 1:
            raise ValueError(f"duplicate sender id: {self.rank} is already registered")
        control.put(reg, {"session": self.engine.session_id, "geometry": self.geometry})
        self._receiver = None
        self._cells: dict[int, StatusCell] = {}
        self._notes: dict[int, int] = {}
        self._modes: dict[int, str] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"cpkv-sender-{self.rank.key}",
                                        daemon=True)
        self._worker.start()

    # -- public ----------------------------------------------------------------------------

    def send(self, request_id: int, page_ids: torch.Tensor, *, num_tokens: int | None = None,
             chunk: tuple[int, int] | None = None, last: bool = True,
             metadata: bytes | None = None) -> None:
        """Queue one chunk of a request (non-blocking). Poll its status with `poll`.

        Args:
            request_id: the request (non-negative int, shared with the receiver).
            page_ids: [n_pages] this pool's page ids of the whole request, in request order.
            num_tokens: tokens of the whole request (default: every slot of its pages).
            chunk: request-local pages [start, stop) of this prefill chunk (default: all).
            last: whether this is the request's last chunk; decide it before filtering by
                share, so every rank agrees (a rank with an empty share still sends it).
            metadata: a small blob (e.g. the first output token) carried with the last chunk.
        """
        if not isinstance(request_id, int) or request_id < 0:
            raise ValueError(f"request_id: expected a non-negative int, got {request_id!r}")
        page_ids = as_page_ids(page_ids, self.cache.num_pages, self.cache.device)
        num_tokens = check_num_tokens(num_tokens, page_ids.numel(), self.cache.page_size)
        n_pages = page_ids.numel()
        start, stop = chunk if chunk is not None else (0, n_pages)
        if not 0 <= start <= stop <= n_pages:
            raise ValueError(f"chunk: expected 0 <= start <= stop <= {n_pages}, "
                             f"got [{start}, {stop})")
        if metadata is not None and not isinstance(metadata, bytes):
            raise TypeError(f"metadata: expected bytes, got {type(metadata).__name__}")
        with self._lock:
            cell = self._cells.setdefault(request_id, StatusCell())
        self._jobs.put((request_id, page_ids, num_tokens, (start, stop), last, metadata, cell))

    def poll(self, request_id: int) -> KVStatus:
        """This rank's status for the request (non-blocking); learns of receiver failures."""
        cell = self._cells.get(request_id)
        if cell is None:
            return KVStatus.Bootstrapping
        if not cell.done:
            key = self.control.key("req", request_id, "status")
            if self.control.exists(key):
                st = self.control.get(key)
                if st["status"] == KVStatus.Failed:
                    cell.fail(f"receiver failed the request: {st['reason']}")
        return cell.status

    def reason(self, request_id: int) -> str | None:
        cell = self._cells.get(request_id)
        return cell.reason if cell else None

    def mode_of(self, request_id: int) -> str | None:
        """The mode ("packed" or "direct") this rank's last send of the request used."""
        return self._modes.get(request_id)

    def forget(self, request_id: int) -> None:
        """Drop a finished request's state."""
        with self._lock:
            self._cells.pop(request_id, None)
            self._notes.pop(request_id, None)
            self._modes.pop(request_id, None)

    def close(self) -> None:
        """Stop the worker (pending sends fail), release owned engine and arena. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._jobs.put(None)
        self._worker.join(timeout=self.timeout + 5)
        self._release_owned()

    # -- worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            cell = job[-1]
            if self._closing.is_set():
                cell.fail("the sender was closed")
                continue
            if cell.done:
                continue
            try:
                self._send_chunk(*job[:-1], cell)
            except Exception as e:  # any failure fails this request, never the sender
                cell.fail(f"{type(e).__name__}: {e}")
                try:
                    self.control.put(self.control.key("req", job[0], "fail", self.rank.key),
                                     cell.reason)
                except Exception:
                    pass  # the control plane itself may be gone
        while not self._jobs.empty():  # closing: fail what is still queued
            job = self._jobs.get_nowait()
            if job is not None:
                job[-1].fail("the sender was closed")

    def _receiver_info(self) -> dict:
        if self._receiver is None:
            info = self.control.wait_get(self.control.key("recv"),
                                         cancelled=self._closing.is_set)
            check_geometry(self.geometry, info["geometry"], "the receiver")
            self._receiver = info
        return self._receiver

    def _send_chunk(self, rid, page_ids, num_tokens, chunk, last, metadata, cell) -> None:
        recv = self._receiver_info()
        dest = self.control.wait_get(self.control.key("req", rid, "dest"), self.timeout,
                                     cancelled=self._closing.is_set)
        if dest["num_tokens"] != num_tokens or dest["num_pages"] != page_ids.numel():
            raise ValueError(f"request {rid}: the receiver expects {dest['num_tokens']} tokens in "
                             f"{dest['num_pages']} pages, this sender has {num_tokens} in "
                             f"{page_ids.numel()}")
        if self.route.key not in dest["regions"]:
            raise ValueError(f"request {rid}: the receiver expects no route {self.route.key}")
        cell.update(KVStatus.Transferring)
        share = senders_for(self.policy, page_ids.numel(), self.cp_size, self.rank.cp, rid)
        p0 = max(share.start, chunk[0])
        p1 = max(p0, min(share.stop, chunk[1]))
        ps = self.cache.page_size
        pages, tokens = range(p0, p1), range(min(p0 * ps, num_tokens), min(p1 * ps, num_tokens))
        mode = self._choose_mode(recv, dest, page_ids, pages, tokens)
        self._modes[rid] = mode
        if mode == "direct" and len(tokens):
            segments = direct_segments(self.cache, page_ids, recv["pool"],
                                       recv["geometry"]["num_heads"], dest["page_ids"], pages,
                                       tokens, self.route)
            self.engine.write(recv["session"], segments)
            nbytes = sum(s[2] for s in segments)
        else:
            nbytes = len(tokens) * self.bytes_per_token
            if nbytes:
                with self.arena.alloc(nbytes, timeout=self.timeout) as slot:
                    self._pack_and_write(page_ids[p0:p1], len(tokens), slot.tensor,
                                         recv["session"], dest["addr"]
                                         + dest["regions"][self.route.key]
                                         + tokens.start * self.bytes_per_token)
        with self._lock:
            k = self._notes.get(rid, 0)
            self._notes[rid] = k + 1
        note = {"pages": [p0, p1], "tokens": [tokens.start, tokens.stop], "nbytes": nbytes,
                "mode": mode, "last": bool(last),
                "metadata": base64.b64encode(metadata).decode() if metadata else None}
        self.control.put(self.control.key("req", rid, "note", self.rank.key, k), note)
        if last:
            cell.update(KVStatus.Success)

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

    def _pack_and_write(self, ids, n, staging, peer, dest_addr) -> None:
        """Pack and write a segment of n tokens layer group by layer group, packing group g+1
        while group g is on the wire (the segment is layer-major: group [l0, l1) of the route is
        bytes [l0, l1) x n x row_bytes of it, on both sides)."""
        layers, heads = self.route.src_layers, self.route.src_heads
        per_layer = n * self.bytes_per_token // len(layers)
        pending = []
        try:
            for group in layer_groups(len(layers), n * self.bytes_per_token):
                l0, l1 = group.start, group.stop
                part = staging[l0 * per_layer:l1 * per_layer]
                pack_pages(self.cache, ids, num_tokens=n, heads=heads,
                           layers=(layers.start + l0, layers.start + l1), out=part)
                if part.is_cuda:  # the engine reads the bytes: the pack must have finished
                    torch.cuda.current_stream(part.device).synchronize()
                pending.append(self.engine.submit(peer, [(part.data_ptr(),
                                                          dest_addr + l0 * per_layer,
                                                          part.numel())]))
        finally:
            self.engine.wait(*pending)  # never release a slot the engine still reads
