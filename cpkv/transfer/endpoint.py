"""What a sender agent and a receiver agent share: who they are (instance, rank, sizes, the
model), a Mooncake engine and a registered staging arena (each borrowed, the usual case in a
worker process, or created and owned), the I/O hub, `wait` on a status that any thread may
change, and the lifecycle (``with``, `close`)."""

from __future__ import annotations

import functools
import os
import threading
import time
import uuid
from dataclasses import replace

import torch

from .._checks import check_int, check_seconds
from .._closing import Closing
from ..layout import PackedFormat, PagedKVCache
from ..parallel import DcpLayout, ParallelRank, ParallelSizes, dcp_heads_of, layers_of
from ..staging import StagingArena
from .engine import TransferEngine
from .mapping import Route, map_ranks
from .protocol import Hello, ModelSpec, ProtocolError, Welcome, check_request_id
from .status import KVStatus

SECRET_ENV = "CPKV_SECRET"
DONE = (KVStatus.Success, KVStatus.Failed)


def check_ready(ready, device: torch.device):
    """``ready`` (what the runner's writes are ordered by) as a CUDA event, or None: a
    ``torch.cuda.Event`` is used as is, a ``torch.cuda.Stream`` gets an event recorded now."""
    if ready is None:
        return None
    if device.type != "cuda":
        raise ValueError(f"ready: a CUDA stream or event orders CUDA pools only; this pool is "
                         f"on {device}")
    if isinstance(ready, torch.cuda.Event):
        return ready
    if isinstance(ready, torch.cuda.Stream):
        return ready.record_event()
    raise TypeError(f"ready: expected a torch.cuda.Event or torch.cuda.Stream, got "
                    f"{type(ready).__name__}")


def resolve_secret(secret) -> bytes | None:
    """``secret`` as bytes; default the ``CPKV_SECRET`` environment variable; None or empty:
    no authentication."""
    secret = os.environ.get(SECRET_ENV) if secret is None else secret
    if secret is not None and not isinstance(secret, (str, bytes)):
        raise TypeError(f"secret: expected str or bytes, got {type(secret).__name__}")
    return (secret.encode() if isinstance(secret, str) else secret) or None


def check_dcp(dcp, rank: ParallelRank, sizes: ParallelSizes) -> DcpLayout | None:
    """A decode context-parallel layout as the agents use it: None for no DCP (size 1); the
    DCP groups are runs of ``dcp.size`` consecutive TP ranks (vLLM and SGLang without PCP), so
    ``dcp.rank`` is ``rank.tp % dcp.size``, and a DCP-sharded instance has no CP."""
    if dcp is None:
        return None
    if not isinstance(dcp, DcpLayout):
        raise TypeError(f"dcp: expected a cpkv.parallel.DcpLayout or None, got "
                        f"{type(dcp).__name__}")
    if dcp.size == 1:
        return None
    if sizes.tp % dcp.size or dcp.rank != rank.tp % dcp.size:
        raise ValueError(f"dcp: expected a group of consecutive TP ranks (size dividing tp "
                         f"{sizes.tp}, rank tp % size = {rank.tp % dcp.size}), got size "
                         f"{dcp.size}, rank {dcp.rank}")
    if sizes.cp > 1:
        raise ValueError(f"dcp: a DCP-sharded instance has no CP ranks, got cp {sizes.cp}")
    return DcpLayout(dcp.size, dcp.rank, dcp.interleave)


def model_shape(cache: PagedKVCache, rank: ParallelRank, sizes: ParallelSizes, kind: str,
                num_kv_heads: int | None, num_layers: int | None,
                dcp: DcpLayout | None = None) -> ModelSpec:
    """The whole model from this rank's pool, checked against it: ``num_kv_heads`` defaults to
    the pool's heads times TP (MHA; divided by the DCP size with DCP; one latent for MLA),
    ``num_layers`` to the pool's layers (required with PP > 1, where stages may be uneven)."""
    if kind not in ("mha", "mla"):
        raise ValueError(f"kind: expected 'mha' or 'mla', got {kind!r}")
    groups = 1 if dcp is None else dcp.size
    if kind == "mla":
        if cache.num_heads != 1:
            raise ValueError(f"kind='mla': expected a pool of one latent head, got "
                             f"{cache.num_heads} heads")
        num_kv_heads = 1
    elif num_kv_heads is None:
        num_kv_heads = cache.num_heads * (sizes.tp // groups)
    if num_layers is None:
        if sizes.pp > 1:
            raise ValueError("num_layers: required with pp > 1 (the model's layer count)")
        num_layers = cache.num_layers
    check_int(num_kv_heads, "num_kv_heads", 1)
    check_int(num_layers, "num_layers", 1)
    if kind == "mha":
        held = len(dcp_heads_of(rank.tp, sizes.tp, groups, num_kv_heads))
        if held != cache.num_heads:
            raise ValueError(f"this pool holds {cache.num_heads} heads; tp rank {rank.tp} of "
                             f"{sizes.tp} (DCP {groups}) holds {held} of {num_kv_heads} KV heads")
    if len(layers_of(rank.pp, sizes.pp, num_layers)) != cache.num_layers:
        raise ValueError(f"this pool holds {cache.num_layers} layers; pp rank {rank.pp} of "
                         f"{sizes.pp} holds {len(layers_of(rank.pp, sizes.pp, num_layers))} of "
                         f"{num_layers} layers")
    return ModelSpec(kind, num_kv_heads, num_layers)


def dcp_of(peer: Hello | Welcome) -> DcpLayout | None:
    """A peer's DCP layout (None: its pool holds requests contiguously)."""
    return None if peer.dcp is None else DcpLayout(*peer.dcp)


def identity(cache: PagedKVCache, instance: str, rank: ParallelRank, sizes: ParallelSizes,
             model: ModelSpec, incarnation: str, session: str,
             dcp: DcpLayout | None = None) -> dict:
    """The fields a Hello and a Welcome share: who an agent is and what its pool holds."""
    return dict(instance=instance, rank=rank, sizes=sizes, model=model,
                incarnation=incarnation, session=session,
                unit=cache.packed_format(1, layers=(0, 1), heads=(0, 1)),
                page_size=cache.page_size, num_heads=cache.num_heads,
                num_layers=cache.num_layers, layout=cache.layout,
                dcp=None if dcp is None else (dcp.size, dcp.rank, dcp.interleave))


def routes_between(source: Hello | Welcome, dest: Hello | Welcome) -> list[Route]:
    """The routes that fill decode rank ``dest`` from prefill instance ``source``'s ranks.

    With DCP, the ranks of a DCP group hold the same heads (`dcp_heads_of`): heads are
    mapped between the groups (TP / DCP of them on each side), and a route's ``tp`` names the
    source's DCP group, every rank of which sends its tokens (`route_senders`)."""
    def groups(peer):
        d = 1 if peer.dcp is None else peer.dcp[0]
        return replace(peer.sizes, tp=peer.sizes.tp // d), peer.rank.tp // d
    src_sizes, _ = groups(source)
    dst_sizes, dst_tp = groups(dest)
    return list(_routes(src_sizes, dst_sizes, dest.model, dst_tp, dest.rank.pp))


@functools.lru_cache(maxsize=1024)
def _routes(src_sizes: ParallelSizes, dst_sizes: ParallelSizes, model: ModelSpec, tp: int,
            pp: int) -> tuple[Route, ...]:
    """`map_ranks` for one decode rank, once per pair of sizes (routes are frozen)."""
    return tuple(map_ranks(src_sizes, dst_sizes, num_kv_heads=model.num_kv_heads,
                           num_layers=model.num_layers, kind=model.kind)[(tp, pp)])


def route_senders(route: Route, source: Hello | Welcome, dp: int) -> list[ParallelRank]:
    """The source instance's ranks that send a route: every CP rank, and every rank of the
    DCP group the route's ``tp`` names."""
    d = 1 if source.dcp is None else source.dcp[0]
    return [ParallelRank(dp, c, route.tp * d + k, route.pp)
            for c in range(source.sizes.cp) for k in range(d)]


def feeds(route: Route, peer: Hello | Welcome) -> bool:
    """Whether rank ``peer`` (a sender) is one of those that send ``route``."""
    d = 1 if peer.dcp is None else peer.dcp[0]
    return route.tp == peer.rank.tp // d and route.pp == peer.rank.pp


def check_peer(mine: Hello | Welcome, theirs: Hello | Welcome, who: str) -> None:
    """Raise ProtocolError naming the first field where a peer cannot exchange bytes with this
    agent: the model, the packed format's version and components (head_dim, dtype)."""
    if theirs.model != mine.model:
        raise ProtocolError(f"{who} serves another model: {theirs.model} there, "
                            f"{mine.model} here")
    try:
        theirs.unit.check_matches(mine.unit)
    except ValueError as e:
        raise ProtocolError(f"{who}: {e}") from None


class Endpoint(Closing):
    """Identity, engine, arena and lifecycle shared by `KVSender` and `KVReceiver`."""

    def __init__(self, cache: PagedKVCache, *, instance: str, rank: ParallelRank | None,
                 sizes: ParallelSizes | None, kind: str, num_kv_heads: int | None,
                 num_layers: int | None, dcp: DcpLayout | None, engine: TransferEngine | None,
                 arena: StagingArena | None, arena_bytes: int, timeout: float, secret):
        self._owns_engine = self._owns_arena = False
        self._pool_regs: list[int] = []
        self.engine = self.arena = None
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache: expected a PagedKVCache, got {type(cache).__name__}")
        if not isinstance(instance, str) or not 0 < len(instance) <= 128:
            raise ValueError(f"instance: expected a name of 1 to 128 characters, got "
                             f"{instance!r}")
        rank = ParallelRank() if rank is None else rank
        sizes = ParallelSizes() if sizes is None else sizes
        if not isinstance(sizes, ParallelSizes):
            raise TypeError(f"sizes: expected a ParallelSizes, got {type(sizes).__name__}")
        sizes.check(rank)
        check_seconds(timeout, "timeout")
        self.cache, self.instance, self.rank, self.sizes = cache, instance, rank, sizes
        self.dcp = check_dcp(dcp, rank, sizes)
        self.model = model_shape(cache, rank, sizes, kind, num_kv_heads, num_layers, self.dcp)
        self.timeout = float(timeout)
        self.secret = resolve_secret(secret)
        self.incarnation = uuid.uuid4().hex[:16]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever a status moves
        self._closed = False
        self._owns_engine, self._owns_arena = engine is None, arena is None
        try:
            self.engine = engine or TransferEngine()
            self.arena = arena or StagingArena(arena_bytes, device=cache.device)
            self.arena_addr = self.engine.register_arena(self.arena)  # once per arena
        except BaseException:
            self._release_owned()
            raise

    def _identity(self) -> dict:
        """This agent's Hello or Welcome fields (the same for both)."""
        return identity(self.cache, self.instance, self.rank, self.sizes, self.model,
                        self.incarnation, self.engine.session_id, self.dcp)

    def register_pool(self) -> None:
        """Register the pool's storages with the engine (direct mode reads/writes them);
        unregistered at close. Packed mode never exposes the pool."""
        for layers in self.cache.buffers.values():
            for t in layers:
                st = t.untyped_storage()
                if st.data_ptr() not in self._pool_regs:
                    self._pool_regs.append(self.engine.register_range(st.data_ptr(),
                                                                      st.nbytes(), t.device))

    def route_format(self, route: Route, rows: int, *, source: bool) -> PackedFormat:
        """The packed format of ``rows`` tokens of a route (its heads and layers of this
        pool: the source ranges on a sender, the destination ones on a receiver)."""
        heads = route.src_heads if source else route.dst_heads
        layers = route.src_layers if source else route.dst_layers
        return self.cache.packed_format(rows, layers=layers, heads=heads)

    def _status(self, request_id):  # pragma: no cover - each agent defines it
        raise NotImplementedError

    def poll(self, request_id) -> KVStatus:  # pragma: no cover - each agent defines it
        raise NotImplementedError

    def wait(self, request_id, timeout: float | None = None) -> KVStatus:
        """Block until the request is Success or Failed and return that status; with
        ``timeout`` (seconds), return whatever the status is then. Wakes as soon as the status
        moves (no polling delay). Every request ends by itself within its own timeouts, so
        ``timeout=None`` does not hang."""
        check_request_id(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.poll(request_id)
            left = None if deadline is None else deadline - time.monotonic()
            if status in DONE or (left is not None and left <= 0):
                return status
            with self._changed:
                if self._status(request_id) not in DONE:
                    # a bound on the nap: CUDA completions are seen by polling events
                    self._changed.wait(0.05 if left is None else min(left, 0.05))

    def _notify(self) -> None:
        """Wake `wait`ers (call with the lock held)."""
        self._changed.notify_all()

    def _release_owned(self) -> None:
        """Unregister the pool, close what this endpoint created (the arena first: it
        unregisters itself)."""
        for addr in self._pool_regs:
            if self.engine is not None and not self.engine.closed:
                self.engine.unregister(addr)
        self._pool_regs = []
        if self._owns_arena and self.arena is not None:
            self.arena.close()
            self.arena = None
        if self._owns_engine and self.engine is not None:
            self.engine.close()
            self.engine = None
