"""`KVStore`: a paged KV pool's full pages in Mooncake Store, written by every CP rank.

Store pages and values
    The store's ``page_size`` T is the key granularity (see `cpkv.store.keys`). The value under a
    key is one store page packed in cpkv's packed format (`cpkv.layout`) for T tokens: for each
    layer of the rank's slice, for each component, ``[T, heads of the slice, head_dim]``, bytes
    unchanged. Its size is ``cache.packed_nbytes(T, layers=..., heads=...)``.

Page sizes
    A writer's pool page size W must divide T (a store page starts on a pool page); a reader's
    pool page size R is free: loads run in batches that start on reader pages, and the last
    reader page of a load is partial when R does not divide the loaded tokens (`LoadResult`
    says how many tokens, store pages and whole reader pages arrived).

Write path (`put_prefix`)
    Keys of the prompt's full store pages; this rank's share is ``page_share(n_pages, cp_size,
    cp_rank)`` (every CP rank writes, so write bandwidth scales with CP; among TP replicas of one
    head shard only the lowest writes). Keys that exist are skipped (one ``batch_is_exist``). The
    rest go in batches: one `pack_pages` of the batch's tokens, reordered page-major into a
    staging slot registered with the store, then one ``batch_put_from`` straight from the slot.

Read path (`match_prefix`, `load_prefix`)
    ``match_prefix`` counts leading stored pages and MIN-reduces the count over the given process
    groups (CP and TP: ranks must agree on one hit length or they diverge). ``load_prefix`` gets
    batches with ``batch_get_into`` into a registered slot, reorders them layer-major and unpacks
    into the pool with one `unpack_pages` per batch. It stops at the first page that did not
    arrive whole (evicted since the match, master gone, size mismatch) and reports how many pages
    it loaded; pages past that are never written.

Faults
    The master is probed with a TCP connect (``connect_timeout``) before set-up, so an unreachable
    master is a `StoreError` at once instead of Mooncake's ~90 s of retries. With the master gone
    mid-run, existence checks and gets fail (a clean miss: ``match_prefix`` returns the pages
    found before the failure, ``load_prefix`` stops) and a put raises `StoreError`, each at once
    or after Mooncake's RPC timeout (~4 s a call here); ``close`` then takes ~11 s (Mooncake's
    unmount retries), bounded. A frozen master (alive, not answering) costs Mooncake's 30 s RPC
    timeout per call, with the same outcome.

Lifetime
    Objects live in the segments of the clients that wrote them (``segment_nbytes`` each): they
    disappear with the writer's `KVStore` (Mooncake unmounts its segment on close). ``close()``
    unregisters the staging buffer, closes the client, frees the staging arena and stops an
    embedded master.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._checks import as_page_ids
from .._closing import Closing
from ..cp.partition import page_share
from ..kernels import pack_pages, unpack_pages
from ..layout import PackedFormat, PagedKVCache, as_range
from ..parallel import ParallelRank, ParallelSizes
from ..staging import ALIGN, StagingArena
from .keys import at, check_model, is_store_writer, page_keys, value_geometry
from .master import MasterProcess, port_open

__all__ = ["KVStore", "LoadResult", "PutResult", "StoreError"]

EXIST_CHUNK = 1024  # keys per batch_is_exist call


class StoreError(RuntimeError):
    """A Mooncake Store operation failed: ``op``, the native ``code`` and the ``key`` involved."""

    def __init__(self, op: str, message: str, *, code: int | None = None, key: str | None = None):
        self.op, self.code, self.key = op, code, key
        where = f" (code {code}{f', key {key!r}' if key else ''})" if code is not None else ""
        super().__init__(f"store {op}: {message}{where}")


@dataclass(frozen=True)
class PutResult:
    """What one `KVStore.put_prefix` did: this rank's share (store pages), written, skipped."""

    share: range
    written: int
    skipped: int
    nbytes: int


@dataclass(frozen=True)
class LoadResult:
    """What one `KVStore.load_prefix` loaded.

    ``num_pages`` leading store pages (``num_tokens`` tokens, ``full_pages`` whole reader pages)
    are in the pool; nothing past them was written. ``reason`` says why fewer than
    ``requested`` arrived (None when all did).
    """

    num_pages: int
    num_tokens: int
    full_pages: int
    requested: int
    nbytes: int
    reason: str | None = None


def _positive(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what}: expected a positive int, got {value!r}")
    return value


def _word(*quantities: int) -> torch.dtype:
    for size, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if all(q % size == 0 for q in quantities):
            return dt
    return torch.uint8


def _reorder(src: torch.Tensor, dst: torch.Tensor, rows: list[int], k: int, tokens: int,
             to_page_major: bool) -> None:
    """Layer-major ``[blocks][k*tokens rows]`` -> page-major ``[k][blocks][tokens rows]``
    (``to_page_major``), or back.

    ``rows`` are the row bytes of each block (layer x component) in format order. Both are flat
    uint8 buffers of ``k * tokens * sum(rows)`` bytes; one copy when all rows are equal.
    """
    obj = tokens * sum(rows)
    word = _word(obj, *(tokens * r for r in rows), src.data_ptr(), dst.data_ptr())
    size = torch.empty((), dtype=word).element_size()
    lm, pm = (src, dst) if to_page_major else (dst, src)
    lm, pm = lm[:k * obj].view(word), pm[:k * obj].view(word)
    if len(set(rows)) == 1:
        span = tokens * rows[0] // size
        a = lm.view(len(rows), k, span).transpose(0, 1)
        b = pm.view(k, len(rows), span)
        (b.copy_(a) if to_page_major else a.copy_(b))
        return
    pages = pm.view(k, obj // size)
    lm_off = pm_off = 0
    for r in rows:
        span = tokens * r // size
        block = lm[lm_off:lm_off + k * span].view(k, span)
        part = pages[:, pm_off:pm_off + span]
        (part.copy_(block) if to_page_major else block.copy_(part))
        lm_off += k * span
        pm_off += span


class KVStore(Closing):
    """A rank's client of Mooncake Store for paged KV, with a registered staging arena.

    Args:
        page_size: the store page T in tokens (key granularity; equal on every rank and reader).
        master: ``"host:port"`` of a running `mooncake_master`, a `MasterProcess`, or None to
            start an embedded one on loopback (owned: stopped at `close`). In a group, start one
            master (e.g. on rank 0 or the launcher) and pass its address to every rank.
        rank, sizes: this rank's coordinates and the deployment's parallel sizes (cp/tp/pp);
            default a single rank.
        kind: "mha" (K/V per head shard) or "mla" (latent, replicated over TP).
        num_kv_heads: the model's total KV heads (decides TP key suffixes for "mha").
        model: whose KV this is: a model id (weights, revision, quantisation; no "/"), first
            part of every key and seed of every page hash. Required: two models with the same
            geometry (e.g. two fine-tunes of one base) must never share values.
        segment_nbytes: memory this client contributes to the store (where puts land).
        staging_nbytes: the registered staging arena (two slots of a batch must fit).
        local_buffer_nbytes: Mooncake's own client buffer (cpkv's transfers do not use it).
        batch_pages: store pages per batch_put/batch_get.
        connect_timeout: seconds for the master reachability probe before set-up.
        host: this client's address (loopback by default).

    Example::

        store = KVStore(page_size=16, model="llama-3.1-8b")  # embedded master on 127.0.0.1
        store.put_prefix(cache, page_ids, prompt)        # this rank's share of full pages
        hit = store.match_prefix(prompt, cache, group=cp_group)  # agreed over the group
        got = store.load_prefix(reader_cache, reader_ids, prompt, num_pages=hit)
        store.close()
    """

    def __init__(self, *, page_size: int, model: str,
                 master: str | MasterProcess | None = None,
                 rank: ParallelRank | None = None, sizes: ParallelSizes | None = None,
                 kind: str = "mha", num_kv_heads: int = 1, segment_nbytes: int = 256 << 20,
                 staging_nbytes: int = 64 << 20, local_buffer_nbytes: int = 16 << 20,
                 batch_pages: int = 64, connect_timeout: float = 2.0, host: str = "127.0.0.1"):
        self.page_size = _positive(page_size, "page_size")
        self.rank, self.sizes = at(rank, sizes)
        if kind not in ("mha", "mla"):
            raise ValueError(f"kind: expected 'mha' or 'mla', got {kind!r}")
        self.kind, self.num_kv_heads = kind, _positive(num_kv_heads, "num_kv_heads")
        self.model = check_model(model)
        at(self.rank, self.sizes)
        is_store_writer(self.rank, self.sizes, kind=kind,
                        num_kv_heads=num_kv_heads)  # validates the TP/head split
        self.batch_pages = _positive(batch_pages, "batch_pages")
        for what, v in (("segment_nbytes", segment_nbytes), ("staging_nbytes", staging_nbytes),
                        ("local_buffer_nbytes", local_buffer_nbytes)):
            _positive(v, what)
        if not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
            raise ValueError(f"connect_timeout: expected seconds > 0, got {connect_timeout!r}")
        if master is not None and not isinstance(master, (str, MasterProcess)):
            raise TypeError(f"master: expected 'host:port', MasterProcess or None, got "
                            f"{type(master).__name__}")
        self.closed = False
        self._client = None
        self._arena = None
        self._registered = None
        self._owned_master = None
        try:
            if master is None:
                self._owned_master = master = MasterProcess(host=host)
            self.master_address = master.address if isinstance(master, MasterProcess) \
                else master
            self._connect(host, segment_nbytes, local_buffer_nbytes, staging_nbytes,
                          connect_timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, host, segment_nbytes, local_buffer_nbytes, staging_nbytes,
                 connect_timeout) -> None:
        mhost, _, mport = self.master_address.rpartition(":")
        if not mhost or not mport.isdigit():
            raise ValueError(f"master: expected 'host:port', got {self.master_address!r}")
        if not port_open(mhost, int(mport), connect_timeout):
            raise StoreError("setup", f"master {self.master_address} is unreachable (no TCP "
                             f"connect within {connect_timeout} s)")
        from mooncake.store import MooncakeDistributedStore

        self._client = client = MooncakeDistributedStore()  # closed by close() on any failure
        rc = client.setup(host, "P2PHANDSHAKE", segment_nbytes, local_buffer_nbytes, "tcp", "",
                          self.master_address)
        if rc != 0:
            raise StoreError("setup", f"client set-up against master {self.master_address} "
                             f"failed", code=rc)
        self._arena = StagingArena(staging_nbytes, backend="host")
        ptr = self._arena.buffer.data_ptr()
        rc = client.register_buffer(ptr, self._arena.nbytes)
        if rc != 0:
            raise StoreError("register_buffer", f"{self._arena.nbytes} bytes", code=rc)
        self._registered = ptr

    # -- keys ------------------------------------------------------------------------------

    def value_format(self, cache: PagedKVCache, *, layers=None, heads=None) -> PackedFormat:
        """The geometry of one stored value for this pool's ``layers``/``heads`` slice: the
        packed format of one store page. Part of every key (`cpkv.store.keys`)."""
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache: expected PagedKVCache, got {type(cache).__name__}")
        return cache.packed_format(self.page_size, layers=layers, heads=heads)

    def keys(self, token_ids, cache: PagedKVCache, *, layers=None, heads=None,
             rank: ParallelRank | None = None, sizes: ParallelSizes | None = None) -> list[str]:
        """Keys of the full store pages of ``token_ids`` holding this pool's ``layers`` /
        ``heads`` slice, for ``rank`` of ``sizes`` (default this store's)."""
        return self._keys(token_ids, self.value_format(cache, layers=layers, heads=heads),
                          rank, sizes)

    def _keys(self, token_ids, fmt: PackedFormat, rank, sizes) -> list[str]:
        return page_keys(token_ids, fmt, rank or self.rank, sizes or self.sizes,
                         model=self.model, kind=self.kind, num_kv_heads=self.num_kv_heads)

    @property
    def client(self):
        """The underlying `MooncakeDistributedStore` (for raw operations and benchmarks)."""
        self._check_open()
        return self._client

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError("use", "the store is closed")

    def _check_cache(self, cache, layers, heads) -> tuple[range, range, int]:
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache: expected PagedKVCache, got {type(cache).__name__}")
        lr = as_range(layers, cache.num_layers, "layers")
        hr = as_range(heads, cache.num_heads, "heads")
        obj = cache.packed_nbytes(self.page_size, layers=lr, heads=hr)
        if obj == 0:
            raise ValueError("layers/heads: expected a non-empty slice, got an empty one")
        if 2 * obj > self._room:
            raise ValueError(f"staging_nbytes: expected room for two store pages "
                             f"({2 * obj} bytes, plus alignment), got {self._arena.nbytes}")
        return lr, hr, obj

    @property
    def _room(self) -> int:
        """Bytes two slots may hold together (each slot is rounded up to the arena alignment)."""
        return self._arena.nbytes - 2 * ALIGN

    def _exists(self, keys: list[str]) -> list[int]:
        out = []
        for i in range(0, len(keys), EXIST_CHUNK):
            out.extend(self._client.batch_is_exist(keys[i:i + EXIST_CHUNK]))
        return out

    def _buffers(self, cache, nbytes: int):
        """A registered host slot, and a scratch buffer on the pool's device (a slot on CPU)."""
        slot = self._arena.alloc(nbytes)
        if cache.device.type != "cpu":
            return slot, None
        try:
            return slot, self._arena.alloc(nbytes)
        except BaseException:
            slot.release()
            raise

    # -- write -----------------------------------------------------------------------------

    def put_prefix(self, cache: PagedKVCache, page_ids, token_ids, *, layers=None, heads=None,
                   rank: ParallelRank | None = None,
                   sizes: ParallelSizes | None = None) -> PutResult:
        """Write this rank's share of the prompt's full store pages that are not stored yet.

        Args:
            cache: the rank's pool (after the CP all-gather it holds the whole prompt);
                ``cache.page_size`` must divide the store page size.
            page_ids: [n] pool page ids of the prompt in request order, covering every full
                store page of ``token_ids``.
            token_ids: [L] the prompt's token ids (tensor, numpy array or list); tokens past
                the last full store page are not stored.
            layers, heads: the slice of the pool whose bytes this rank's keys hold (default all).
            rank, sizes: whose keys and share (default the store's).

        Returns a `PutResult`; raises `StoreError` when the store refuses a put (e.g. master
        gone), after releasing its slots.
        """
        self._check_open()
        rank, sizes = at(rank or self.rank, sizes or self.sizes)
        lr, hr, obj = self._check_cache(cache, layers, heads)
        keys = self.keys(token_ids, cache, layers=lr, heads=hr, rank=rank, sizes=sizes)
        if self.page_size % cache.page_size:
            raise ValueError(f"cache.page_size: expected a divisor of the store page size "
                             f"{self.page_size}, got {cache.page_size}")
        per = self.page_size // cache.page_size
        ids = as_page_ids(page_ids, cache.num_pages, cache.device)
        if ids.numel() < len(keys) * per:
            raise ValueError(f"page_ids: expected at least {len(keys) * per} pool pages for "
                             f"{len(keys)} store pages, got {ids.numel()}")
        writer = is_store_writer(rank, sizes, kind=self.kind, num_kv_heads=self.num_kv_heads)
        share = page_share(len(keys), sizes.cp, rank.cp) if writer else range(0)
        if not share:
            return PutResult(share, 0, 0, 0)
        present = self._exists([keys[i] for i in share])
        for i, rc in zip(share, present, strict=True):
            if rc < 0:
                raise StoreError("is_exist", f"existence check failed (master "
                                 f"{self.master_address})", code=rc, key=keys[i])
        todo = [i for i, rc in zip(share, present, strict=True) if rc == 0]
        k = max(1, min(self.batch_pages, self._room // (2 * obj)))
        rows = cache.packed_format(1, layers=lr, heads=hr).row_nbytes * len(lr)
        offs = torch.arange(per, device=ids.device)
        for b in range(0, len(todo), k):
            batch = todo[b:b + k]
            sel = ids[(torch.tensor(batch, device=ids.device)[:, None] * per + offs).reshape(-1)]
            slot, scratch = self._buffers(cache, len(batch) * obj)
            try:
                dst = slot.tensor
                if len(batch) == 1 or len(rows) == 1:
                    src = pack_pages(cache, sel, num_tokens=len(batch) * self.page_size,
                                     layers=lr, heads=hr,
                                     out=dst if scratch is not None else None, validate=False)
                    if scratch is None:
                        dst.copy_(src)
                else:
                    src = pack_pages(cache, sel, num_tokens=len(batch) * self.page_size,
                                     layers=lr, heads=hr,
                                     out=scratch.tensor if scratch is not None else None,
                                     validate=False)
                    if scratch is None:
                        src = src.cpu()
                    _reorder(src, dst, rows, len(batch), self.page_size, to_page_major=True)
                base = dst.data_ptr()
                rcs = self._client.batch_put_from([keys[i] for i in batch],
                                                  [base + j * obj for j in range(len(batch))],
                                                  [obj] * len(batch))
            finally:
                slot.release()
                if scratch is not None:
                    scratch.release()
            for i, rc in zip(batch, rcs, strict=True):
                if rc != 0:
                    raise StoreError("put", f"batch of {len(batch)} store pages refused "
                                     f"(master {self.master_address})", code=rc, key=keys[i])
        return PutResult(share, len(todo), len(share) - len(todo), len(todo) * obj)

    # -- read ------------------------------------------------------------------------------

    def match_prefix(self, token_ids, cache: PagedKVCache, *, layers=None, heads=None,
                     group=None, rank: ParallelRank | None = None,
                     sizes: ParallelSizes | None = None) -> int:
        """Leading full store pages of ``token_ids`` stored for this pool's ``layers`` /
        ``heads`` slice (its value geometry is part of the keys: values of another geometry are
        never counted) under the keys of ``rank`` of ``sizes`` (default this store's).

        ``group``: a process group, or a sequence of them (e.g. the CP group and the TP group);
        the count is MIN-reduced over each, so every rank of them gets the same answer. An
        existence check that fails (master gone) ends the count there: a clean miss.
        """
        self._check_open()
        keys = self.keys(token_ids, cache, layers=layers, heads=heads, rank=rank, sizes=sizes)
        hit = 0
        for i in range(0, len(keys), EXIST_CHUNK):
            chunk = self._client.batch_is_exist(keys[i:i + EXIST_CHUNK])
            run = next((j for j, rc in enumerate(chunk) if rc != 1), len(chunk))
            hit += run
            if run < len(chunk):
                break
        return self.agree(hit, group)

    @staticmethod
    def agree(count: int, group=None) -> int:
        """MIN of ``count`` over ``group`` (None, a process group, or a sequence of groups)."""
        groups = [] if group is None else list(group) if isinstance(group, Sequence) \
            else [group]
        for g in groups:
            device = "cuda" if dist.get_backend(g) == "nccl" else "cpu"
            t = torch.tensor([count], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g)
            count = int(t.item())
        return count

    def load_prefix(self, cache: PagedKVCache, page_ids, token_ids, *,
                    num_pages: int | None = None, layers=None, heads=None,
                    rank: ParallelRank | None = None,
                    sizes: ParallelSizes | None = None) -> LoadResult:
        """Load the first ``num_pages`` store pages of ``token_ids`` into the pool.

        Args:
            cache: the reader's pool, any page size R.
            page_ids: [n] distinct pool page ids in request order, at least
                ``ceil(num_pages * store page size / R)``.
            token_ids: the prompt (its full-page keys are looked up).
            num_pages: store pages to load (default: this rank's `match_prefix`; pass the agreed
                count from ``match_prefix(group=...)`` in a group).
            layers, heads: where in this pool the stored slice goes (a PP stage's layer range,
                a TP rank's head slice); the stored values must have that geometry.
            rank, sizes: whose keys to read (default the store's), e.g. TP shard 1 of a
                TP2 writer group when this reader holds all heads.

        Returns a `LoadResult`. Stops at the first store page that does not arrive whole
        (evicted, master gone, wrong size); later pool pages are not written.
        """
        self._check_open()
        lr, hr, obj = self._check_cache(cache, layers, heads)
        fmt = self.value_format(cache, layers=lr, heads=hr)
        keys = self._keys(token_ids, fmt, rank, sizes)
        if num_pages is None:
            num_pages = self.match_prefix(token_ids, cache, layers=lr, heads=hr, rank=rank,
                                          sizes=sizes)
        if not isinstance(num_pages, int) or isinstance(num_pages, bool) \
                or not 0 <= num_pages <= len(keys):
            raise ValueError(f"num_pages: expected an int in [0, {len(keys)}] (full store "
                             f"pages of the prompt), got {num_pages!r}")
        T, R = self.page_size, cache.page_size
        need = -(-num_pages * T // R)
        ids = as_page_ids(page_ids, cache.num_pages, cache.device, unique=True)
        if ids.numel() < need:
            raise ValueError(f"page_ids: expected at least {need} pool pages of size {R} for "
                             f"{num_pages} store pages of {T} tokens, got {ids.numel()}")
        step = R // math.gcd(T, R)  # store pages per whole number of reader pages
        cap = self._room // (2 * obj)
        if cap < step:
            raise ValueError(f"staging_nbytes: a batch must hold {step} store pages "
                             f"({2 * step * obj} bytes) to start on reader pages, got "
                             f"{self._arena.nbytes}")
        k = max(step, min(self.batch_pages, cap) // step * step)
        rows = cache.packed_format(1, layers=lr, heads=hr).row_nbytes * len(lr)
        loaded, reason = 0, None
        for s in range(0, num_pages, k):
            batch = keys[s:min(num_pages, s + k)]
            slot, scratch = self._buffers(cache, len(batch) * obj)
            try:
                base = slot.tensor.data_ptr()
                rcs = self._client.batch_get_into(batch, [base + j * obj
                                                          for j in range(len(batch))],
                                                  [obj] * len(batch))
                good = next((j for j, rc in enumerate(rcs) if rc != obj), len(batch))
                if good < len(batch):
                    rc = rcs[good]
                    reason = (f"store page {s + good} ({batch[good]!r}) did not arrive: "
                              + (f"no value of geometry [{value_geometry(fmt)}] (never "
                                 f"written, evicted, or stored with another geometry)"
                                 if rc in (-704,) else
                                 f"got {rc} bytes, expected {obj}" if rc >= 0 else
                                 f"code {rc}"))
                if good:
                    self._unpack(slot.tensor, scratch, cache, ids, s, good, obj, lr, hr, rows)
            finally:
                slot.release()
                if scratch is not None:
                    scratch.release()
            loaded += good
            if reason is not None:
                break
        return LoadResult(loaded, loaded * T, loaded * T // R, num_pages, loaded * obj, reason)

    def _unpack(self, got, scratch, cache, ids, start, n, obj, lr, hr, rows) -> None:
        """Unpack ``n`` page-major store pages (store page ``start`` on) into the pool."""
        T, R = self.page_size, cache.page_size
        tokens = n * T
        if n == 1 or len(rows) == 1:
            packed = got[:n * obj]
        else:
            out = scratch.tensor if scratch is not None else torch.empty(
                n * obj, dtype=torch.uint8, device=cache.device)
            src = got if scratch is not None else got[:n * obj].to(cache.device)
            _reorder(src, out, rows, n, T, to_page_major=False)
            packed = out[:n * obj]
        packed = packed.to(cache.device)
        first = start * T // R
        unpack_pages(packed, cache, ids[first:first + -(-tokens // R)], num_tokens=tokens,
                     layers=lr, heads=hr, validate=False)

    # -- removal and teardown --------------------------------------------------------------

    def evict(self, token_ids, cache: PagedKVCache, *, start: int = 0, layers=None, heads=None,
              rank: ParallelRank | None = None, sizes: ParallelSizes | None = None) -> int:
        """Remove the stored pages ``start..`` of ``token_ids`` holding this pool's ``layers``
        / ``heads`` slice (forcibly, one batched call); returns how many were removed.

        A prefix stays valid: later pages name longer prefixes, so removing from ``start`` on
        never leaves a page whose predecessors are gone.
        """
        self._check_open()
        keys = self.keys(token_ids, cache, layers=layers, heads=heads, rank=rank, sizes=sizes)
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= len(keys):
            raise ValueError(f"start: expected an int in [0, {len(keys)}], got {start!r}")
        if start == len(keys):
            return 0
        return sum(rc == 0 for rc in self._client.batch_remove(keys[start:], True))

    def close(self) -> None:
        """Unregister the staging buffer, close the client, free the arena, stop an embedded
        master. Idempotent; bounded even with the master gone (~11 s of Mooncake retries)."""
        self.closed = True
        errors = []
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            if getattr(self, "_registered", None) is not None:
                try:
                    client.unregister_buffer(self._registered)
                except Exception as e:
                    errors.append(e)
            try:
                client.close()
            except Exception as e:
                errors.append(e)
        self._registered = None
        if getattr(self, "_arena", None) is not None:
            self._arena.close()
            self._arena = None
        if getattr(self, "_owned_master", None) is not None:
            self._owned_master.close()
            self._owned_master = None
        if errors:
            raise StoreError("close", f"releasing the client failed: {errors}")
