"""`PrefixLoad`: a prefix load from the store, layer group by layer group.

A stored value is one store page, page-major: ``cache.packed_format(T)`` of the rank's slice
(all its layers, layer-major inside the value). Layers ``[l0, l1)`` of a value are one byte
range of it (`PackedFormat.segment`), so a layer group of every page is fetched with one ranged
get per page (Mooncake's get sessions: the replicas are looked up once per batch, then each
value's range is read straight into a registered slot), and the slot then holds, page after
page, exactly the values of the group's layers: one `unpack_pages(region_tokens=T)` puts them
in the pool. A plan of one group is a plain load: whole values with ``batch_get_into``.

What the handle promises
    ``layers_ready`` counts the leading layers (of the load's layer slice) whose every page
    ``[0, num_pages)`` is in the pool; it only grows, one group at a time, after the group's
    last batch is unpacked (on CUDA: when the event recorded after that unpack has completed).

Failures
    The first group decides how many pages load: it stops at the first page that did not
    arrive whole (missing or evicted: "not stored", the master gone, a wrong size) and later
    groups load only the pages before it (``num_pages`` is final once ``layers_ready > 0``). A
    later group that fails (master gone mid-load, a page evicted since) stops the load there:
    ``reason`` says which page and why, ``num_layers`` the layers that did load. Pool pages past
    the loaded ones are never written; on a stopped load the layers past ``num_layers`` of the
    loaded pages hold undefined bytes (the runner recomputes them).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import is_int
from ..layout import PackedFormat, PagedKVCache

__all__ = ["LoadResult", "PrefixLoad", "plan_layer_groups"]

MAX_BATCH_KEYS = 1024  # keys per Mooncake batch call (TCP refuses ~2,100 descriptors per peer)
NOT_FOUND = -704  # Mooncake's OBJECT_NOT_FOUND


@dataclass(frozen=True)
class LoadResult:
    """What one prefix load loaded.

    ``num_pages`` leading store pages (``num_tokens`` tokens, ``full_pages`` whole reader pages)
    of ``num_layers`` leading layers of the load's slice are in the pool; nothing past those
    pages was written. ``reason`` says why fewer pages (or layers) than ``requested`` arrived
    (None when all did).
    """

    num_pages: int
    num_tokens: int
    full_pages: int
    requested: int
    nbytes: int
    num_layers: int = 0
    reason: str | None = None


def plan_layer_groups(layers: range, groups=None) -> list[range]:
    """Cut ``layers`` into the consecutive groups a streaming load fetches in turn.

    ``groups``: None (doubling: 1, 1, 2, 4, ... layers, so the first layer is ready after a
    small fraction of the bytes and each later group lands while the runner computes the ones
    before it), an int (that many balanced groups), or a sequence of group sizes summing to
    ``len(layers)``.

    >>> plan_layer_groups(range(10))
    [range(0, 1), range(1, 2), range(2, 4), range(4, 8), range(8, 10)]
    >>> plan_layer_groups(range(2, 8), 2)
    [range(2, 5), range(5, 8)]
    """
    n = len(layers)
    if groups is None:
        sizes, size = [], 1
        while sum(sizes) < n:
            sizes.append(min(size, n - sum(sizes)))
            size = 1 if len(sizes) == 1 else 2 * size
    elif is_int(groups):
        if not 1 <= groups <= n:
            raise ValueError(f"layer_groups: expected 1..{n} groups, got {groups}")
        base, rem = divmod(n, groups)
        sizes = [base + (g < rem) for g in range(groups)]
    elif isinstance(groups, Sequence) and not isinstance(groups, str):
        sizes = list(groups)
        if not sizes or any(not is_int(s) or s < 1 for s in sizes) or sum(sizes) != n:
            raise ValueError(f"layer_groups: expected positive group sizes summing to {n}, "
                             f"got {groups!r}")
    else:
        raise TypeError(f"layer_groups: expected None, an int or a sequence of ints, got "
                        f"{type(groups).__name__}")
    out, start = [], layers.start
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


def _why(page: int, key: str, rc: int, want: int, geometry: str) -> str:
    what = (f"not stored for geometry [{geometry}] (never written, evicted, or stored with "
            f"another geometry)" if rc == NOT_FOUND else
            f"got {rc} bytes, expected {want}" if rc >= 0 else f"code {rc}")
    return f"store page {page} ({key!r}) did not arrive: {what}"


class PrefixLoad:
    """A load of a stored prefix into a pool, one layer group at a time.

    Made by `KVStore.load_prefix_async` (running in a background thread) or with
    ``start=False`` (the caller drives it with `step`). ``layers_ready`` / `wait` say how many
    leading layers are in the pool, so a runner can start the forward pass on them while later
    groups arrive; `result` gives the `LoadResult` when the load has ended.

    Example::

        load = store.load_prefix_async(cache, ids, prompt, num_pages=hit)
        for layer in range(cache.num_layers):
            load.wait(layer + 1)                  # this layer of every page is in the pool
            forward_layer(layer)
        got = load.result()                       # num_pages, num_layers, reason
    """

    def __init__(self, store, cache: PagedKVCache, ids: torch.Tensor, keys: list[str],
                 fmt: PackedFormat, layers: range, heads: range, groups: list[range],
                 geometry: str):
        self._store, self._cache, self._ids, self._keys = store, cache, ids, keys
        self._fmt, self._layers, self._heads, self._groups = fmt, layers, heads, groups
        self._geometry = geometry
        self.requested = len(keys)
        self.num_pages = len(keys)
        self.reason: str | None = None
        self._next = 0  # the next group to load
        self._done_layers = 0  # leading layers unpacked (events recorded on CUDA)
        self._events: list = []  # (layers after the group, CUDA event) per loaded group
        self._nbytes = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopped = False

    # -- state -------------------------------------------------------------------------------

    @property
    def layer_groups(self) -> list[range]:
        """The pool layer ranges loaded in turn."""
        return list(self._groups)

    @property
    def done(self) -> bool:
        """Whether the load has ended (every group loaded, or stopped with a reason)."""
        with self._cond:
            return self._stopped

    @property
    def layers_ready(self) -> int:
        """Leading layers of the load's slice whose every page is in the pool (non-blocking:
        on CUDA, groups whose unpack event has not completed yet do not count)."""
        with self._cond:
            if not self._events:
                return self._done_layers
            ready = 0
            for upto, event in self._events:
                if not event.query():
                    break
                ready = upto
            return ready

    def wait(self, layers: int | None = None, timeout: float | None = None) -> int:
        """Block until ``layers`` leading layers (default all) are ready or the load ended;
        returns ``layers_ready`` (fewer than asked when the load stopped or timed out)."""
        want = len(self._layers) if layers is None else layers
        with self._cond:
            self._cond.wait_for(lambda: self._done_layers >= want or self._stopped, timeout)
            events = list(self._events)
        for upto, event in events:  # CUDA: the group's bytes are in the pool once it completed
            event.synchronize()
            if upto >= want:
                break
        return self.layers_ready

    def event(self, layers: int, timeout: float | None = None):
        """CUDA pools: the event after which ``layers`` leading layers are in the pool, for a
        runner's stream to wait on (``stream.wait_event``) without a host synchronisation;
        blocks the host only until that group's unpack has been issued. None on the CPU (the
        bytes are in the pool once `wait` returns), or when the load ended without them."""
        with self._cond:
            self._cond.wait_for(lambda: self._done_layers >= layers or self._stopped, timeout)
            return next((e for upto, e in self._events if upto >= layers), None)

    def result(self, timeout: float | None = None) -> LoadResult:
        """The outcome once the load has ended (blocks up to ``timeout`` s; TimeoutError)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._stopped, timeout):
                raise TimeoutError(f"the prefix load did not end within {timeout} s")
            if self._error is not None:
                raise self._error
        self.wait()
        T, R = self._fmt.num_tokens, self._cache.page_size
        n = self.num_pages
        return LoadResult(n, n * T, n * T // R, self.requested, self._nbytes,
                          self.layers_ready, self.reason)

    # -- driving -----------------------------------------------------------------------------

    def start(self) -> PrefixLoad:
        """Run the remaining groups in a background thread; returns self."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the load is already running in the background")
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="cpkv-prefix-load")
        self._store._loads.add(self)
        self._thread.start()
        return self

    def step(self) -> bool:
        """Load the next layer group on this thread; False once the load has ended."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the load runs in the background: use wait()/result()")
        with self._cond:
            if self._stopped:
                return False
        try:
            more = self._load_group()
        except BaseException as e:  # a bug or a closed store: the handle reports it
            with self._cond:
                self._error, self._stopped = e, True
                self._cond.notify_all()
            raise
        if not more:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()
        return more

    def run(self) -> LoadResult:
        """Load every remaining group on this thread and return the result."""
        while self.step():
            pass
        return self.result()

    def _run(self) -> None:
        try:
            while self.step():
                pass
        except BaseException:
            pass  # recorded by step(); result() raises it
        finally:
            self._store._loads.discard(self)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background thread (if any) to finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    # -- one group ---------------------------------------------------------------------------

    def _load_group(self) -> bool:
        """Fetch and unpack group ``self._next`` for pages [0, num_pages); False when done."""
        if self._next >= len(self._groups) or self.num_pages == 0:
            return False
        group = self._groups[self._next]
        first = self._next == 0
        l0, l1 = group.start - self._layers.start, group.stop - self._layers.start
        whole = (l0, l1) == (0, len(self._layers))
        span = self._fmt.segment(0, self._fmt.num_tokens, l0, l1)  # the group in one value
        batch = self._store._reader_batch(self._cache, span.nbytes)
        for s in range(0, self.num_pages, batch):
            keys = self._keys[s:min(self.num_pages, s + batch)]
            got, rc = self._store._fetch(keys, span, whole, self._cache, self._ids, s, group,
                                         self._heads)
            self._nbytes += got * span.nbytes
            if got < len(keys):
                why = _why(s + got, keys[got], rc, span.nbytes, self._geometry)
                if first:  # the loaded prefix ends here
                    self.num_pages, self.reason = s + got, why
                    break
                self.reason = (f"layers [{group.start}, {group.stop}) stopped: {why}; layers "
                               f"[{self._layers.start}, {group.start}) of {self.num_pages} "
                               f"pages are loaded")
                return False
        self._next += 1
        if self.num_pages == 0:  # nothing loaded: no layer is ready
            return False
        upto = l1
        event = None
        if self._cache.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        with self._cond:
            self._done_layers = upto
            if event is not None:
                self._events.append((upto, event))
            self._cond.notify_all()
        return self._next < len(self._groups)


def reader_batch(store_page: int, reader_page: int, value_nbytes: int, room: int,
                 batch_pages: int | None) -> int:
    """Store pages per batch: as many as ``room`` bytes hold (at most ``batch_pages`` and
    `MAX_BATCH_KEYS`), a multiple of the store pages that make whole reader pages (``step``),
    so every batch starts on a reader page; one step even past ``batch_pages``. 0 when the
    room does not hold one step."""
    step = reader_page // math.gcd(store_page, reader_page)
    room_pages = room // max(value_nbytes, 1)
    if room_pages < step:
        return 0
    cap = min(room_pages, batch_pages or MAX_BATCH_KEYS, MAX_BATCH_KEYS)
    return max(step, cap // step * step)
