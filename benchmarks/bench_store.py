"""Store sweep: a prompt's pages through cpkv's store tier vs one raw object of the same bytes.

One embedded `mooncake_master` and one Mooncake Store client on TCP loopback; fragmented pool
page ids; pool page size = store page size. Providers, per (shape, page size):

* cpkv-put:  `KVStore.put_prefix` (existence check, pack, page-major reorder into the registered
             slot, ``batch_put_from`` per batch of store pages); the keys are evicted between
             repeats (untimed) so every repeat writes
* raw-put:   one ``put_from`` of the same number of bytes as one object (the store's ceiling)
* cpkv-get:  `KVStore.load_prefix` into a reader pool (``batch_get_into``, reorder, unpack)
* raw-get:   one ``get_into`` of that object

torch runs one intra-op thread. A cpkv case and its raw case take turns within every repeat
(same load on a shared machine).
One client holds the only segment, so every object lands in local memory: the sweep isolates
cpkv's own cost (pack, reorder, per-key metadata) from the TCP path, which `cpkv demo --store`
shows across processes.

Rows: time (ms), bandwidth (GB/s over the payload bytes, counted once), ``ratio_to_raw``
(raw time / cpkv time, same run) and ``keys`` (store objects per request).

    python -m benchmarks.bench_store [--quick] [--shapes A,C] [--page-sizes 1,16,64]
                                     [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import RESULTS, page_ids, random_fill
from cpkv.kernels import pack_pages
from cpkv.report import CsvWriter, provenance
from cpkv.shapes import SHAPES
from cpkv.store import KVStore, MasterProcess

PAGE_SIZES = (1, 16, 64)
SHAPE_NAMES = ("A", "C")


def quantiles(times: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(x) for x in q)


def interleaved(cases: dict, repeats: int, warmup: int = 3) -> dict:
    """(p50, p20, p80) seconds per case; ``cases`` maps name -> (fn, after or None).

    The cases take turns within every repeat, so on a shared, noisy machine each sees the same
    load (ratios side by side, ../shared/BENCHMARKS.md). ``after`` runs untimed (e.g. evict what
    a put wrote). The first ``warmup`` rounds are not kept (first touches of fresh segment and
    staging memory are slow).
    """
    times = {name: [] for name in cases}
    for i in range(warmup + repeats):
        for name, (fn, after) in cases.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            if after is not None:
                after()
    return {name: quantiles(t) for name, t in times.items()}


def check(rc, what: str) -> None:
    if (rc if isinstance(rc, int) else min(rc)) < 0:
        raise RuntimeError(f"{what} failed: {rc}")


def sweep_one(store: KVStore, out: CsvWriter, shape_name: str, page_size: int, tokens: int,
              layers: int | None, repeats: int) -> None:
    shape = SHAPES[shape_name]
    n_pages = tokens // page_size
    pool_pages = n_pages + 8
    src = shape.cache(num_pages=pool_pages, page_size=page_size, num_layers=layers)
    random_fill(src)
    dst = shape.cache(num_pages=pool_pages, page_size=page_size, num_layers=layers)
    src_ids = page_ids("fragmented", n_pages, pool_pages, "cpu", seed=1)
    dst_ids = page_ids("fragmented", n_pages, pool_pages, "cpu", seed=2)
    prompt = torch.randint(0, 100_000, (tokens,), generator=torch.Generator().manual_seed(3))
    store.page_size = page_size
    store.model = f"bench-{shape_name}-{page_size}-{tokens}"
    nbytes = src.packed_nbytes(tokens)
    base = dict(op="store", shape=shape_name, page_size=page_size, tokens=tokens,
                pattern="fragmented")

    def put():
        res = store.put_prefix(src, src_ids, prompt)
        if res.written != n_pages:
            raise RuntimeError(f"put wrote {res.written} of {n_pages} pages")

    def get():
        res = store.load_prefix(dst, dst_ids, prompt, num_pages=n_pages)
        if res.num_pages != n_pages:
            raise RuntimeError(f"load got {res.num_pages} of {n_pages} pages: {res.reason}")

    raw = torch.empty(nbytes, dtype=torch.uint8)
    raw.random_(0, 256)
    back = torch.empty_like(raw)
    client = store.client
    check(client.register_buffer(raw.data_ptr(), nbytes), "register_buffer")
    check(client.register_buffer(back.data_ptr(), nbytes), "register_buffer")
    key = f"{store.model}/raw"
    try:
        t = interleaved({
            "cpkv-put": (put, lambda: store.evict(prompt, src)),
            "raw-put": (lambda: check(client.put_from(key, raw.data_ptr(), nbytes), "put_from"),
                        lambda: client.remove(key, True)),
        }, repeats)
        put()  # leave the pages (and the raw object) stored for the gets
        check(client.put_from(key, raw.data_ptr(), nbytes), "put_from")
        t.update(interleaved({
            "cpkv-get": (get, None),
            "raw-get": (lambda: check(client.get_into(key, back.data_ptr(), nbytes),
                                      "get_into"), None),
        }, repeats))
        if not torch.equal(pack_pages(src, src_ids, num_tokens=tokens),
                           pack_pages(dst, dst_ids, num_tokens=tokens)):
            raise RuntimeError(f"shape {shape_name} page size {page_size}: loaded bytes differ")
        if not torch.equal(raw, back):
            raise RuntimeError("raw get returned other bytes")
        store.evict(prompt, src)
        client.remove(key, True)
    finally:
        client.unregister_buffer(raw.data_ptr())
        client.unregister_buffer(back.data_ptr())

    put_s, raw_put_s, get_s, raw_get_s = (t[k] for k in ("cpkv-put", "raw-put", "cpkv-get",
                                                         "raw-get"))
    for provider, secs in t.items():
        out.timing(metric_base=dict(base, provider=provider), seconds=secs, moved_bytes=nbytes)
    for provider, secs, ceiling in (("cpkv-put", put_s, raw_put_s[0]),
                                    ("cpkv-get", get_s, raw_get_s[0])):
        p50, p20, p80 = secs
        out.write(**base, provider=provider, metric="ratio_to_raw", unit="x",
                  p50=ceiling / p50, p20=ceiling / p80, p80=ceiling / p20)
        out.write(**base, provider=provider, metric="keys", unit="count", p50=n_pages,
                  p20=n_pages, p80=n_pages)
    print(f"shape {shape_name} ps {page_size:>2} {tokens} tok {nbytes / 2**20:6.1f} MiB | "
          f"put {put_s[0] * 1e3:7.1f} ms (raw {raw_put_s[0] * 1e3:6.1f}) | "
          f"get {get_s[0] * 1e3:7.1f} ms (raw {raw_get_s[0] * 1e3:6.1f}) | {n_pages} keys",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cpkv bench store", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 tokens, 8 layers, 7 repeats")
    p.add_argument("--shapes", default=",".join(SHAPE_NAMES), help="comma-separated, of A,B,C")
    p.add_argument("--page-sizes", default=",".join(map(str, PAGE_SIZES)))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9; --quick 7)")
    p.add_argument("--out", default=str(RESULTS / "store.csv"))
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    if not shapes or any(s not in SHAPES for s in shapes):
        p.error(f"--shapes: expected names from {sorted(SHAPES)}, got {args.shapes!r}")
    try:
        page_sizes = [int(x) for x in args.page_sizes.split(",")]
    except ValueError:
        p.error(f"--page-sizes: expected comma-separated ints, got {args.page_sizes!r}")
    if any(ps < 1 or 256 % ps for ps in page_sizes):
        p.error(f"--page-sizes: expected divisors of 256, got {args.page_sizes!r}")
    tokens, layers, repeats = ([256], 8, 7) if args.quick else ([256, 1024], None, 9)
    if args.repeats is not None:
        if args.repeats < 1:
            p.error(f"--repeats: expected a positive int, got {args.repeats}")
        repeats = args.repeats
    # One intra-op thread: on a shared, loaded CPU box torch's thread barriers made the pack and
    # reorder copies 50x slower at random (measured); the raw path uses no torch threads.
    torch.set_num_threads(1)
    out = CsvWriter(args.out, provenance(torch.device("cpu")))
    with MasterProcess() as master:
        store = KVStore(page_size=1, model="bench", master=master.address, segment_nbytes=1 << 30,
                        staging_nbytes=64 << 20, batch_pages=64)
        try:
            for shape in shapes:
                for ps in page_sizes:
                    for n in tokens:
                        sweep_one(store, out, shape, ps, n, layers, repeats)
        finally:
            store.close()
    print(f"wrote {out.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
