"""Store sweep: cpkv's store tier against Mooncake Store's own zero-copy API (the anchor).

One embedded `mooncake_master` and one Mooncake Store client on TCP loopback; fragmented pool
page ids; pool page size = store page size T (one value per pool page). Per (shape, T, tokens),
on the same store, the same keys and the same page-major bytes:

* cpkv-put:     `KVStore.put_prefix` (existence check, one `pack_pages(region_tokens=T)` of each
                batch straight into the registered slot, one ``batch_put_from`` per batch); the
                keys are evicted between repeats (untimed) so every repeat writes
* mooncake-put: the anchor, what a hand-written cache backend does (SGLang HiCache's Mooncake
                backend): ``batch_put_from`` of the same keys from registered host memory that
                already holds the page-major values (at most 1,024 keys a call)
* cpkv-get:     `KVStore.load_prefix` (``batch_get_into`` into the registered slot, one
                `unpack_pages(region_tokens=T)` per batch into the paged pool)
* mooncake-get: the anchor: ``batch_get_into`` of the same keys into registered memory
* cpkv-stream:  `KVStore.load_prefix_async` driven group by group (doubling layer groups,
                ranged reads through get sessions): ``time_first`` when the first layer group
                of every page is in the pool, ``time`` when the last is

The cases take turns within every repeat (ratios side by side on a shared, noisy machine);
torch runs one intra-op thread. One client holds the only segment, so every object lands in
local memory: the sweep isolates cpkv's own cost (pack/unpack, per-key work) from the wire.

The anchor's registered buffer holds at most 1 GiB of values; past that, value j sits at
``j * value_bytes mod`` that size (the same memory traffic, without a second copy of a 4 GiB
prompt on a 24 GiB machine). The loads go back into the writer's pool (poisoned first) and are
verified against the pool's seeded contents, layer by layer, after the timed repeats.

Rows (op=store): time (ms), bandwidth (GB/s over the payload bytes, counted once), keys (store
objects), us_per_key (time / keys), ratio_to_anchor (cpkv-put/-get: anchor p50 time over cpkv
time, same run; cpkv-stream: mooncake-get over the whole streaming load), and for cpkv-stream
time_first and first_fraction (first group / whole streaming load).

    python -m benchmarks.bench_store [--quick] [--shapes A,C] [--page-sizes 1,16,64]
                                     [--tokens 1024,4096,32768] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import RESULTS, page_ids
from cpkv.kernels import pack_pages
from cpkv.report import CsvWriter, provenance, quantiles
from cpkv.shapes import SHAPES
from cpkv.store import KVStore, MasterProcess

PAGE_SIZES = (1, 16, 64)
SHAPE_NAMES = ("A", "C")
TOKENS = (1024, 4096, 32768)
ANCHOR_CAP = 1 << 30  # bytes of the anchor's registered buffer
MAX_KEYS = 1024  # keys per anchor call (what Mooncake's TCP path accepts per peer)
STAGING = 256 << 20
POISON = 0xA5


def interleaved(cases: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: [seconds per timed repeat]}; ``cases`` maps name -> (fn, after or None).

    ``fn`` returns None (its wall time is taken) or a dict of named times in seconds (it times
    itself, e.g. a streaming load's first and last layer). The cases take turns within every
    repeat, so on a shared, noisy machine each sees the same load (ratios side by side,
    ../shared/BENCHMARKS.md). ``after`` runs untimed (e.g. evict what a put wrote). The first
    ``warmup`` rounds are not kept (first touches of fresh segment and staging memory).
    """
    times: dict = {}
    for i in range(warmup + repeats):
        for name, (fn, after) in cases.items():
            t0 = time.perf_counter()
            got = fn()
            wall = time.perf_counter() - t0
            if i >= warmup:
                for key, secs in (got or {name: wall}).items():
                    times.setdefault(key, []).append(secs)
            if after is not None:
                after()
    return times


def check(rcs, what: str, want: int = 0) -> None:
    bad = [rc for rc in rcs if rc != want]
    if bad:
        raise RuntimeError(f"{what} failed: {bad[:3]} ({len(bad)} of {len(rcs)})")


def seeded_fill(cache, seed: int) -> None:
    """Random bytes per (component, layer) from a seeded generator: never time zeros, and the
    loads can be verified by regenerating one layer at a time (`expected_layer`)."""
    for c, layers in enumerate(cache.buffers.values()):
        for i, t in enumerate(layers):
            t.view(torch.uint8).copy_(expected_layer(t, seed, c, i))


def expected_layer(t: torch.Tensor, seed: int, component: int, layer: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + component * 1009 + layer)
    b = t.view(torch.uint8)
    return torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8)


class Anchor:
    """Mooncake Store's own zero-copy calls on the same keys, from/into registered memory
    holding page-major values (capped at `ANCHOR_CAP`, wrapping past it)."""

    def __init__(self, client, keys: list[str], value_nbytes: int):
        self.client, self.keys, self.obj = client, keys, value_nbytes
        per = max(1, ANCHOR_CAP // value_nbytes)
        self.buf = torch.empty(min(len(keys), per) * value_nbytes, dtype=torch.uint8)
        check([client.register_buffer(self.buf.data_ptr(), self.buf.numel())], "register")
        base, size = self.buf.data_ptr(), self.buf.numel()
        self.addresses = [base + (j * value_nbytes) % size for j in range(len(keys))]

    def fill(self, cache, ids: torch.Tensor, T: int) -> None:
        """The page-major values of the first pages (what a runner's host pool would hold)."""
        n = self.buf.numel() // self.obj
        pack_pages(cache, ids[:n], num_tokens=n * T, region_tokens=T, out=self.buf)

    def _batches(self, call, want: int) -> None:
        for s in range(0, len(self.keys), MAX_KEYS):
            keys = self.keys[s:s + MAX_KEYS]
            rcs = call(keys, self.addresses[s:s + MAX_KEYS], [self.obj] * len(keys))
            check(rcs, call.__name__, want)

    def put(self) -> None:
        self._batches(self.client.batch_put_from, 0)

    def get(self) -> None:
        self._batches(self.client.batch_get_into, self.obj)

    def close(self) -> None:
        self.client.unregister_buffer(self.buf.data_ptr())


def sweep_one(store: KVStore, out: CsvWriter, shape_name: str, page_size: int, tokens: int,
              layers: int | None, repeats: int) -> None:
    T = page_size
    n_pages = tokens // T
    pool_pages = n_pages + 8
    cache = SHAPES[shape_name].cache(num_pages=pool_pages, page_size=T, num_layers=layers)
    seeded_fill(cache, seed=T)
    ids = page_ids("fragmented", n_pages, pool_pages, "cpu", seed=1)
    prompt = torch.randint(0, 100_000, (tokens,), generator=torch.Generator().manual_seed(3))
    store.page_size = T
    store.model = f"bench-{shape_name}-{T}-{tokens}"
    keys = store.keys(prompt, cache)
    obj = cache.packed_nbytes(T)
    nbytes = n_pages * obj
    base = dict(op="store", shape=shape_name, page_size=T, tokens=tokens, pattern="fragmented")
    t0 = time.perf_counter()
    store.keys(prompt, cache)
    key_s = time.perf_counter() - t0

    def put():
        res = store.put_prefix(cache, ids, prompt)
        if res.written != n_pages:
            raise RuntimeError(f"put wrote {res.written} of {n_pages} pages")

    def get():
        res = store.load_prefix(cache, ids, prompt, num_pages=n_pages)
        if (res.num_pages, res.reason) != (n_pages, None):
            raise RuntimeError(f"load got {res.num_pages} of {n_pages} pages: {res.reason}")

    def stream():
        t0 = time.perf_counter()
        load = store.load_prefix_async(cache, ids, prompt, num_pages=n_pages, start=False)
        load.step()
        first = time.perf_counter() - t0
        while load.step():
            pass
        last = time.perf_counter() - t0
        res = load.result()
        if (res.num_pages, res.num_layers) != (n_pages, cache.num_layers):
            raise RuntimeError(f"streaming load got {res}")
        return {"cpkv-stream-first": first, "cpkv-stream": last}

    anchor = Anchor(store.client, keys, obj)
    evict = lambda: store.evict(prompt, cache)  # noqa: E731
    try:
        anchor.fill(cache, ids, T)
        t = interleaved({"cpkv-put": (put, evict), "mooncake-put": (anchor.put, evict)},
                        repeats)
        put()  # leave the values stored for the gets
        for buf in cache.buffers.values():  # the loads go back into the pool: poison it
            for x in buf:
                x.view(torch.uint8).fill_(POISON)
        t.update(interleaved({"cpkv-get": (get, None), "mooncake-get": (anchor.get, None),
                              "cpkv-stream": (stream, None)}, repeats))
        verify(cache, ids, seed=T, what=f"shape {shape_name} page size {T} {tokens} tokens")
        store.evict(prompt, cache)
    finally:
        anchor.close()
    report(out, base, {k: quantiles(v) for k, v in t.items()}, nbytes, n_pages, key_s)


def verify(cache, ids: torch.Tensor, *, seed: int, what: str) -> None:
    """Every loaded page holds the seeded bytes of its pool page (one layer at a time)."""
    for c, layers in enumerate(cache.buffers.values()):
        for i, t in enumerate(layers):
            want = expected_layer(t, seed, c, i)[ids.long()]
            if not torch.equal(t.view(torch.uint8)[ids.long()], want):
                raise RuntimeError(f"{what}: loaded bytes differ (component {c}, layer {i})")


def report(out: CsvWriter, base: dict, t: dict, nbytes: int, keys: int, key_s: float) -> None:
    for provider in ("cpkv-put", "mooncake-put", "cpkv-get", "mooncake-get", "cpkv-stream"):
        row = dict(base, provider=provider)
        out.timing(metric_base=row, seconds=t[provider], moved_bytes=nbytes)
        out.write(**row, metric="keys", unit="count", p50=keys, p20=keys, p80=keys)
        p50, p20, p80 = (x * 1e6 / keys for x in t[provider])
        out.write(**row, metric="us_per_key", unit="us", p50=p50, p20=p20, p80=p80)
    for provider, anchor in (("cpkv-put", "mooncake-put"), ("cpkv-get", "mooncake-get"),
                             ("cpkv-stream", "mooncake-get")):
        a, (p50, p20, p80) = t[anchor][0], t[provider]
        out.write(**base, provider=provider, metric="ratio_to_anchor", unit="x",
                  p50=a / p50, p20=a / p80, p80=a / p20)
    first, last = t["cpkv-stream-first"], t["cpkv-stream"]
    stream = dict(base, provider="cpkv-stream")
    out.write(**stream, metric="time_first", unit="ms", p50=first[0] * 1e3,
              p20=first[1] * 1e3, p80=first[2] * 1e3)
    out.write(**stream, metric="first_fraction", unit="x", p50=first[0] / last[0],
              p20=first[1] / last[0], p80=first[2] / last[0])
    out.write(**base, provider="cpkv", metric="key_us", unit="us", p50=key_s * 1e6 / keys,
              p20=key_s * 1e6 / keys, p80=key_s * 1e6 / keys)
    ratio = {p: t[a][0] / t[p][0] for p, a in (("cpkv-put", "mooncake-put"),
                                              ("cpkv-get", "mooncake-get"))}
    print(f"shape {base['shape']} ps {base['page_size']:>2} {base['tokens']:>5} tok "
          f"{nbytes / 2**20:7.1f} MiB {keys:>5} keys | put {t['cpkv-put'][0] * 1e3:7.1f} ms "
          f"(anchor {t['mooncake-put'][0] * 1e3:6.1f}, x{ratio['cpkv-put']:.2f}) | get "
          f"{t['cpkv-get'][0] * 1e3:7.1f} ms (anchor {t['mooncake-get'][0] * 1e3:6.1f}, "
          f"x{ratio['cpkv-get']:.2f}) | stream first {first[0] * 1e3:7.1f} / last "
          f"{last[0] * 1e3:7.1f} ms ({first[0] / last[0]:.2f})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cpkv bench store", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 tokens, 8 layers, 3 repeats")
    p.add_argument("--shapes", default=",".join(SHAPE_NAMES), help="comma-separated, of A,B,C")
    p.add_argument("--page-sizes", default=",".join(map(str, PAGE_SIZES)))
    p.add_argument("--tokens", default=None,
                   help=f"comma-separated (default {','.join(map(str, TOKENS))}; --quick 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    p.add_argument("--out", default=str(RESULTS / "store.csv"))
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    if not shapes or any(s not in SHAPES for s in shapes):
        p.error(f"--shapes: expected names from {sorted(SHAPES)}, got {args.shapes!r}")
    try:
        page_sizes = [int(x) for x in args.page_sizes.split(",")]
        tokens = [int(x) for x in args.tokens.split(",")] if args.tokens else \
            [256] if args.quick else list(TOKENS)
    except ValueError:
        p.error("--page-sizes/--tokens: expected comma-separated ints")
    if any(n < 1 for n in tokens) or any(ps < 1 or n % ps for ps in page_sizes for n in tokens):
        p.error(f"--page-sizes: expected divisors of every --tokens value, got "
                f"{args.page_sizes!r}")
    layers, repeats = (8, 3) if args.quick else (None, 5)
    if args.repeats is not None:
        if args.repeats < 1:
            p.error(f"--repeats: expected a positive int, got {args.repeats}")
        repeats = args.repeats
    # One intra-op thread: on a shared, loaded CPU box torch's thread barriers made the pack and
    # unpack copies 50x slower at random (measured); Mooncake's copies use no torch threads.
    torch.set_num_threads(1)
    biggest = max(SHAPES[s].cache(num_pages=1, page_size=1, num_layers=layers).packed_nbytes(n)
                  for s in shapes for n in tokens)
    out = CsvWriter(args.out, provenance(torch.device("cpu")))
    with MasterProcess() as master:
        store = KVStore(page_size=1, model="bench", master=master.address,
                        segment_nbytes=biggest + biggest // 8 + (64 << 20),
                        staging_nbytes=STAGING)
        try:
            for shape in shapes:
                for n in tokens:
                    for ps in page_sizes:
                        sweep_one(store, out, shape, ps, n, layers, repeats)
        finally:
            store.close()
    print(f"wrote {out.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
