"""`KVStore`: a paged KV pool's full pages in Mooncake Store, written by every CP rank.

Store pages and values
    The store's ``page_size`` T is the key granularity (see `cpkv.store.keys`). The value under a
    key is one store page, page-major: the packed format (`cpkv.layout`) of T tokens of the
    rank's slice, i.e. for each layer of the slice, for each component, ``[T, heads of the slice,
    head_dim]``, bytes unchanged. Its size is ``cache.packed_nbytes(T, layers=..., heads=...)``
    and its geometry (`value_format`) is part of its key, with the model id.

Page sizes
    A writer's pool page size W must divide T (a store page starts on a pool page); a reader's
    pool page size R is free: loads run in batches that start on reader pages, and the last
    reader page of a load is partial when R does not divide the loaded tokens (`LoadResult`
    says how many tokens, store pages and whole reader pages arrived).

Write path (`put_prefix`)
    Keys of the prompt's full store pages; this rank's share is ``page_share(n_pages, cp_size,
    cp_rank)`` (every CP rank writes, so write bandwidth scales with CP; among TP replicas of one
    head shard only the lowest writes). Keys that exist are skipped (``batch_is_exist``, 1,024
    keys a call). The rest go in batches as large as half the staging arena holds (so a load can
    run beside a put): one `pack_pages` of the batch's pages writes the page-major values
    straight into a staging slot registered with the store, then one ``batch_put_from`` puts
    them from the slot. Per key, only the key string and its slot address are built in Python.

Read path (`match_prefix`, `load_prefix`, `load_prefix_async`)
    ``match_prefix`` counts leading stored pages and MIN-reduces the count over the given process
    groups (CP and TP: ranks must agree on one hit length or they diverge). ``load_prefix`` gets
    batches of whole values with ``batch_get_into`` into a registered slot and unpacks each
    batch into the pool with one `unpack_pages`. ``load_prefix_async`` streams: layer group by
    layer group (ranged reads of every value, see `cpkv.store.load`), with a handle that says
    how many leading layers are in the pool. Both stop at the first page that did not arrive
    whole (evicted since the match, master gone, size mismatch) and report how many pages
    (and layers) they loaded; pool pages past those are never written.

Faults
    The master is probed with a TCP connect (``connect_timeout``) before set-up, so an unreachable
    master is a `StoreError` at once instead of Mooncake's ~90 s of retries. With the master gone
    mid-run, existence checks and gets fail (a clean miss: ``match_prefix`` returns the pages
    found before the failure, a load stops) and a put raises `StoreError`, each at once or after
    Mooncake's RPC timeout (~4 s a call here); ``close`` then takes ~11 s (Mooncake's unmount
    retries), bounded. A frozen master (alive, not answering) costs Mooncake's 30 s RPC timeout
    per call, with the same outcome.

Lifetime
    Objects live in the segments of the clients that wrote them (``segment_nbytes`` each): they
    disappear with the writer's `KVStore` (Mooncake unmounts its segment on close). ``close()``
    waits for background loads, unregisters the staging buffer, closes the client, frees the
    staging arena and stops an embedded master.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import as_page_ids, check_count, check_seconds, is_int
from .._closing import Closing
from .._groups import group_min
from .._net import port_open
from ..cp.partition import page_share
from ..kernels import pack_pages, unpack_pages
from ..layout import PackedFormat, PagedKVCache, Span, as_range
from ..parallel import ParallelRank, ParallelSizes
from ..staging import ALIGN, StagingArena
from .keys import at, check_model, is_store_writer, page_keys, value_geometry
from .load import MAX_BATCH_KEYS, LoadResult, PrefixLoad, plan_layer_groups, reader_batch
from .master import MasterProcess

__all__ = ["KVStore", "LoadResult", "PrefixLoad", "PutResult", "StoreError"]

SLOT_WAIT = 120.0  # seconds a batch waits for staging room held by a concurrent put or load


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



class KVStore(Closing):
    """A rank's client of Mooncake Store for paged KV, with a registered staging arena.

    Args:
        page_size: the store page T in tokens (key granularity; equal on every rank and reader).
        model: whose KV this is: a model id (weights, revision, quantisation; no "/"), first
            part of every key and seed of every page hash. Required: two models with the same
            geometry (e.g. two fine-tunes of one base) must never share values.
        master: ``"host:port"`` of a running `mooncake_master`, a `MasterProcess`, or None to
            start an embedded one on loopback (owned: stopped at `close`). In a group, start one
            master (e.g. on rank 0 or the launcher) and pass its address to every rank.
        rank, sizes: this rank's coordinates and the deployment's parallel sizes (cp/tp/pp);
            default a single rank.
        kind: "mha" (K/V per head shard) or "mla" (latent, replicated over TP).
        num_kv_heads: the model's total KV heads (decides TP key suffixes for "mha").
        segment_nbytes: memory this client contributes to the store (where puts land).
        staging_nbytes: the registered staging arena (at least two store pages; a put or load
            batch takes up to half of it).
        local_buffer_nbytes: Mooncake's own client buffer (cpkv's transfers do not use it).
        batch_pages: at most this many store pages per batch call (default: as many as half
            the staging arena holds, at most 1,024).
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
                 batch_pages: int | None = None, connect_timeout: float = 2.0,
                 host: str = "127.0.0.1"):
        self.page_size = check_count(page_size, "page_size", 1)
        self.rank, self.sizes = at(rank, sizes)
        if kind not in ("mha", "mla"):
            raise ValueError(f"kind: expected 'mha' or 'mla', got {kind!r}")
        self.kind, self.num_kv_heads = kind, check_count(num_kv_heads, "num_kv_heads", 1)
        self.model = check_model(model)
        is_store_writer(self.rank, self.sizes, kind=kind,
                        num_kv_heads=num_kv_heads)  # validates the TP/head split
        self.batch_pages = None if batch_pages is None else check_count(batch_pages,
                                                                        "batch_pages", 1)
        for what, v in (("segment_nbytes", segment_nbytes), ("staging_nbytes", staging_nbytes),
                        ("local_buffer_nbytes", local_buffer_nbytes)):
            check_count(v, what, 1)
        check_seconds(connect_timeout, "connect_timeout")
        if master is not None and not isinstance(master, (str, MasterProcess)):
            raise TypeError(f"master: expected 'host:port', MasterProcess or None, got "
                            f"{type(master).__name__}")
        self.closed = False
        self._client = None
        self._arena = None
        self._registered = None
        self._owned_master = None
        self._loads: set[PrefixLoad] = set()
        self._loads_lock = threading.Lock()
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
        for i in range(0, len(keys), MAX_BATCH_KEYS):
            out.extend(self._client.batch_is_exist(keys[i:i + MAX_BATCH_KEYS]))
        return out

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
        present = self._exists(keys[share.start:share.stop])
        for i, rc in zip(share, present, strict=True):
            if rc < 0:
                raise StoreError("is_exist", f"existence check failed (master "
                                 f"{self.master_address})", code=rc, key=keys[i])
        todo = [i for i, rc in zip(share, present, strict=True) if rc == 0]
        k = self._batch(obj)
        pool_pages = ids.view(-1)[:len(keys) * per].view(len(keys), per)
        for b in range(0, len(todo), k):
            batch = todo[b:b + k]
            sel = pool_pages[torch.tensor(batch, device=ids.device)].view(-1)
            fmt = cache.packed_format(len(batch) * self.page_size, layers=lr, heads=hr,
                                      region_tokens=self.page_size)
            with self._arena.alloc(fmt.nbytes, timeout=SLOT_WAIT) as slot:
                values = pack_pages(cache, sel, num_tokens=fmt.num_tokens, layers=lr, heads=hr,
                                    region_tokens=self.page_size, validate=False,
                                    out=slot.tensor if cache.device.type == "cpu" else None)
                if values.data_ptr() != slot.tensor.data_ptr():
                    slot.tensor[:fmt.nbytes].copy_(values)  # a GPU pool: one copy to the host
                rcs = self._client.batch_put_from([keys[i] for i in batch],
                                                  _addresses(slot.tensor, fmt),
                                                  [obj] * len(batch))
            for i, rc in zip(batch, rcs, strict=True):
                if rc != 0:
                    raise StoreError("put", f"batch of {len(batch)} store pages refused "
                                     f"(master {self.master_address})", code=rc, key=keys[i])
        return PutResult(share, len(todo), len(share) - len(todo), len(todo) * obj)

    def _batch(self, value_nbytes: int) -> int:
        """Store pages per put batch: half the arena's room, ``batch_pages``, 1,024 keys."""
        return max(1, min(self._room // 2 // value_nbytes, self.batch_pages or MAX_BATCH_KEYS,
                          MAX_BATCH_KEYS))

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
        for i in range(0, len(keys), MAX_BATCH_KEYS):
            chunk = self._client.batch_is_exist(keys[i:i + MAX_BATCH_KEYS])
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
        return group_min([count], groups)[0]

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
        return self.load_prefix_async(cache, page_ids, token_ids, num_pages=num_pages,
                                      layers=layers, heads=heads, layer_groups=1, rank=rank,
                                      sizes=sizes, start=False).run()

    def load_prefix_async(self, cache: PagedKVCache, page_ids, token_ids, *,
                          num_pages: int | None = None, layers=None, heads=None,
                          layer_groups=None, rank: ParallelRank | None = None,
                          sizes: ParallelSizes | None = None, start: bool = True) -> PrefixLoad:
        """Start loading the first ``num_pages`` store pages layer group by layer group.

        Arguments as in `load_prefix`, plus ``layer_groups`` (see `plan_layer_groups`:
        default doubling groups 1, 1, 2, 4, ... layers; 1 loads whole values at once) and
        ``start`` (False: the caller drives the load with `PrefixLoad.step`). Every argument
        is checked (and ``num_pages`` matched when None) before this returns; the fetching
        runs in a background thread. The handle's ``layers_ready`` / ``wait`` say how many
        leading layers of the slice are in the pool, ``result`` the final `LoadResult`.
        """
        self._check_open()
        lr, hr, obj = self._check_cache(cache, layers, heads)
        fmt = self.value_format(cache, layers=lr, heads=hr)
        keys = self._keys(token_ids, fmt, rank, sizes)
        if num_pages is None:
            num_pages = self.match_prefix(token_ids, cache, layers=lr, heads=hr, rank=rank,
                                          sizes=sizes)
        if not is_int(num_pages) or not 0 <= num_pages <= len(keys):
            raise ValueError(f"num_pages: expected an int in [0, {len(keys)}] (full store "
                             f"pages of the prompt), got {num_pages!r}")
        groups = plan_layer_groups(lr, layer_groups)
        T, R = self.page_size, cache.page_size
        need = -(-num_pages * T // R)
        ids = as_page_ids(page_ids, cache.num_pages, cache.device, unique=True)
        if ids.numel() < need:
            raise ValueError(f"page_ids: expected at least {need} pool pages of size {R} for "
                             f"{num_pages} store pages of {T} tokens, got {ids.numel()}")
        if self._reader_batch(cache, obj) == 0:
            step = R // math.gcd(T, R)  # store pages that make whole reader pages
            raise ValueError(f"staging_nbytes: a batch must hold {step} store pages "
                             f"({2 * step * obj} bytes) to start on reader pages, got "
                             f"{self._arena.nbytes}")
        load = PrefixLoad(self, cache, ids, keys[:num_pages], fmt, lr, hr, groups,
                          value_geometry(fmt))
        return load.start() if start else load

    def _reader_batch(self, cache: PagedKVCache, value_nbytes: int) -> int:
        """Store pages per load batch of values of ``value_nbytes`` (whole reader pages)."""
        return reader_batch(self.page_size, cache.page_size, value_nbytes, self._room // 2,
                            self.batch_pages)

    def _fetch(self, keys: list[str], span: Span, whole: bool, cache: PagedKVCache,
               ids: torch.Tensor, start: int, layers: range, heads: range) -> tuple[int, int]:
        """Fetch bytes ``span`` (the values' ``layers``) of the values under ``keys`` (store
        pages ``start`` on) and unpack the leading ones that arrived whole into the pool.

        Returns (values that arrived whole, the first bad one's code or 0)."""
        self._check_open()
        (offset, size), n, T = span, len(keys), self.page_size
        fmt = cache.packed_format(n * T, layers=layers, heads=heads, region_tokens=T)
        with self._arena.alloc(fmt.nbytes, timeout=SLOT_WAIT) as slot:
            addresses = _addresses(slot.tensor, fmt)
            if whole:
                rcs = self._client.batch_get_into(keys, addresses, [size] * n)
            else:
                opened = self._client.batch_get_session_start(keys)
                try:
                    rcs = self._client.batch_get_into_multi_buffer_ranges(
                        keys, [[a] for a in addresses], [[size]] * n, [[offset]] * n)
                finally:
                    self._client.batch_get_session_end(keys)
                rcs = [o if o < 0 else rc for o, rc in zip(opened, rcs, strict=True)]
            good = next((j for j, rc in enumerate(rcs) if rc != size), n)
            if good:  # the leading values that arrived, from a reader page on
                tokens, first = good * T, start * T // cache.page_size
                values = slot.tensor[:fmt.segment(0, tokens).end]
                unpack_pages(values.to(cache.device), cache,
                             ids[first:first + -(-tokens // cache.page_size)], num_tokens=tokens,
                             layers=layers, heads=heads, region_tokens=T, validate=False)
        return good, (rcs[good] if good < n else 0)

    # -- removal and teardown --------------------------------------------------------------

    def evict(self, token_ids, cache: PagedKVCache, *, start: int = 0, layers=None, heads=None,
              rank: ParallelRank | None = None, sizes: ParallelSizes | None = None) -> int:
        """Remove the stored pages ``start..`` of ``token_ids`` holding this pool's ``layers``
        / ``heads`` slice (forcibly, batched); returns how many were removed.

        A prefix stays valid: later pages name longer prefixes, so removing from ``start`` on
        never leaves a page whose predecessors are gone.
        """
        self._check_open()
        keys = self.keys(token_ids, cache, layers=layers, heads=heads, rank=rank, sizes=sizes)
        if not is_int(start) or not 0 <= start <= len(keys):
            raise ValueError(f"start: expected an int in [0, {len(keys)}], got {start!r}")
        removed = 0
        for i in range(start, len(keys), MAX_BATCH_KEYS):
            rcs = self._client.batch_remove(keys[i:i + MAX_BATCH_KEYS], True)
            removed += sum(rc == 0 for rc in rcs)
        return removed

    def close(self) -> None:
        """Wait for background loads, unregister the staging buffer, close the client, free the
        arena, stop an embedded master. Idempotent; bounded even with the master gone (~11 s
        of Mooncake retries)."""
        for load in list(getattr(self, "_loads", ())):
            load.join(SLOT_WAIT)
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


def _addresses(slot: torch.Tensor, fmt: PackedFormat) -> list[int]:
    """Address of every value of a slot of format ``fmt`` (cut into store pages)."""
    base = slot.data_ptr()
    return [base + fmt.region(j).offset for j in range(fmt.num_regions)]

