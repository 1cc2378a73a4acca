"""Layer-wise sends and the streaming receiver (issue 11): a runner reports layers as its
forward pass computes them, each newly ready layer group is shipped and unpacked at once, and
Success still means every layer of every route is in the pool. One process: real Mooncake
engines on TCP loopback, a real TCPStore; pools compared with torch.equal."""

import csv
import subprocess
import sys
import time
import uuid

import pytest
import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, oracle_unpack, snapshot
from txtest import DONE, close_all, wait_all

from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank
from cpkv.transfer.mapping import Route

PS, LAYERS = 4, 4


def pools(src_pages=16, dst_pages=16, src_layers=LAYERS, dst_layers=LAYERS, heads=2):
    src = make_cache(mha(num_heads=heads), num_layers=src_layers, num_pages=src_pages,
                     page_size=PS, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=dst_layers, num_pages=dst_pages,
                                   page_size=PS, seed=2))
    return src, dst


def rig_group(rig, src, dst, *, cp=2, routes=None, srcs=None, timeout=10.0, coalesce=0,
              grace=None):
    """Senders (cp per route, each over its own pool in ``srcs``) and one receiver."""
    engine, send_arena, recv_arena, control = rig
    ns = uuid.uuid4().hex
    routes = routes or [Route.whole(dst.num_heads, dst.num_layers)]
    srcs = srcs or [src] * len(routes)
    senders = [KVSender(s, control.scoped(ns), rank=ParallelRank(cp=c, tp=r.tp, pp=r.pp),
                        cp_size=cp, route=r, timeout=timeout, engine=engine,
                        arena=send_arena, coalesce=coalesce)
               for r, s in zip(routes, srcs, strict=True) for c in range(cp)]
    recv = KVReceiver(dst, control.scoped(ns), cp_size=cp, routes=routes, timeout=timeout,
                      engine=engine, arena=recv_arena, grace=grace)
    return senders, recv


def until(cond, timeout=10.0):
    """Poll ``cond`` (bounded); True once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


def test_layers_stream_into_the_pool_as_the_runner_reports_them(rig):
    """CP 2, one call per layer: after layers [0, 2) the receiver has those layers of the
    request's pages bit-exact, the rest untouched, and not Success; then all of it."""
    src, dst = pools()
    senders, recv = rig_group(rig, src, dst)
    s_ids, d_ids = torch.randperm(16)[:5], torch.randperm(16)[:5]
    n = 5 * PS - 1
    before = snapshot(dst)
    want = oracle_unpack(src, s_ids, dst, d_ids, n, range(LAYERS), range(2), range(LAYERS),
                         range(2))
    recv.expect(7, d_ids, num_tokens=n)
    assert recv.layers_ready(7) == 0
    for upto in (1, 2):
        for s in senders:
            s.send_layers(7, s_ids, upto, num_tokens=n)
    assert until(lambda: recv.poll(7) is KVStatus.Transferring and recv.layers_ready(7) == 2)
    now = snapshot(dst)
    for c in ("k", "v"):
        for layer in range(LAYERS):
            assert torch.equal(now[c][layer], (want if layer < 2 else before)[c][layer])
    for upto in (3, 4):
        for s in senders:
            s.send_layers(7, s_ids, upto, num_tokens=n, last=upto == 4,
                          metadata=b"tok" if upto == 4 else None)
    assert wait_all([(recv, 7)] + [(s, 7) for s in senders]) == [KVStatus.Success] * 3
    assert recv.layers_ready(7) == LAYERS and recv.metadata(7) == b"tok"
    assert_cache_equals(dst, want)
    close_all(senders, recv)


def test_chunked_prefill_layer_by_layer_with_empty_shares(rig):
    """10 pages over 2 ranks (shares [0, 5) and [5, 10)), chunks [0, 3), [5, 10), [3, 5):
    each chunk's share is empty on one rank, layers reported one by one per chunk."""
    src, dst = pools()
    senders, recv = rig_group(rig, src, dst)
    s_ids, d_ids = torch.randperm(16)[:10], torch.randperm(16)[:10]
    n = 10 * PS - 2
    want = oracle_unpack(src, s_ids, dst, d_ids, n, range(LAYERS), range(2), range(LAYERS),
                         range(2))
    recv.expect(1, d_ids, num_tokens=n)
    chunks = [(0, 3), (5, 10), (3, 5)]
    for i, chunk in enumerate(chunks):
        for upto in range(1, LAYERS + 1):
            last = i == len(chunks) - 1 and upto == LAYERS
            for s in senders:
                s.send_layers(1, s_ids, upto, num_tokens=n, chunk=chunk, last=last)
        if not i:  # the first chunk's pages are complete, the second's not yet sent
            assert until(lambda: recv.poll(1) is KVStatus.Transferring)
            assert recv.layers_ready(1) == 0
    assert wait_all([(recv, 1)] + [(s, 1) for s in senders]) == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    close_all(senders, recv)


def test_tp_pp_routes_with_layers_starting_above_zero(rig):
    """Two prefill TP ranks (one head each) of the second pipeline stage: route layers
    [2, 4) of 4-layer prefill pools land in layers [0, 2) of the decode pool, each route in
    its own head. Reports below layer 2 ship nothing; the partial count follows route 0's
    and route 1's slowest layer."""
    srcs = [make_cache(mha(num_heads=1), num_layers=4, num_pages=8, page_size=PS, seed=10 + t)
            for t in range(2)]
    _, dst = pools(dst_layers=2)
    routes = [Route(t, 1, range(1), range(t, t + 1), range(2, 4), range(2)) for t in range(2)]
    senders, recv = rig_group(rig, None, dst, routes=routes, srcs=srcs)
    s_ids, d_ids = torch.randperm(8)[:3], torch.randperm(16)[:3]
    n = 3 * PS
    want = snapshot(dst)
    for t in range(2):
        want = oracle_unpack(srcs[t], s_ids, dst, d_ids, n, range(2, 4), range(1), range(2),
                             range(t, t + 1), want=want)
    before = snapshot(dst)
    recv.expect(3, d_ids, num_tokens=n)
    for s in senders:
        s.send_layers(3, s_ids, 2, num_tokens=n)  # layers 0 and 1 are not this stage's
    for s in senders[:2]:  # route tp0 reaches layer 3; route tp1 still at 2
        s.send_layers(3, s_ids, 3, num_tokens=n)
    pages = d_ids.tolist()
    assert until(lambda: recv.poll(3) is KVStatus.Transferring and torch.equal(
        snapshot(dst)["v"][0][pages, :, 0], want["v"][0][pages, :, 0]))
    assert recv.layers_ready(3) == 0  # route tp1's layer 0 is missing
    now = snapshot(dst)
    assert torch.equal(now["k"][0][pages, :, 0], want["k"][0][pages, :, 0])
    assert torch.equal(now["k"][0][:, :, 1], before["k"][0][:, :, 1])
    assert torch.equal(now["k"][1], before["k"][1])
    for s in senders[2:]:
        s.send_layers(3, s_ids, 3, num_tokens=n)
    assert until(lambda: recv.layers_ready(3) == 1)
    for s in senders:
        s.send_layers(3, s_ids, 4, num_tokens=n, last=True)
    assert wait_all([(recv, 3)] + [(s, 3) for s in senders]) == [KVStatus.Success] * 5
    assert_cache_equals(dst, want)
    close_all(senders, recv)


def test_small_layers_are_coalesced(rig):
    """With the default threshold a tiny request's per-layer reports ship as one group when
    the chunk's last layer is ready: one notification with every layer, then the last."""
    src, dst = pools()
    engine, send_arena, recv_arena, control = rig
    ns = uuid.uuid4().hex
    sender = KVSender(src, control.scoped(ns), engine=engine, arena=send_arena)
    recv = KVReceiver(dst, control.scoped(ns), engine=engine, arena=recv_arena)
    recv.expect(5, torch.tensor([3, 4]), num_tokens=2 * PS)
    note = f"{recv._requests[5].prefix}/note/{ParallelRank().key}"
    for upto in range(1, LAYERS + 1):
        sender.send_layers(5, torch.tensor([1, 2]), upto)
    assert until(lambda: len(control.lines(note, 0)) == 1)
    assert control.lines(note, 0)[0]["layers"] == [0, LAYERS]
    sender.send_layers(5, torch.tensor([1, 2]), LAYERS, last=True)
    assert wait_all([(recv, 5), (sender, 5)]) == [KVStatus.Success] * 2
    close_all([sender], recv)


def test_failure_mid_stream_leaves_other_pages_untouched_and_fences_the_slot(rig):
    """The sender reports two of four layers and stalls: they land, the receiver times out.
    Only the request's pages changed (guards around them did not), the slot stays
    quarantined until the sender acknowledges, and its late layers are refused unwritten."""
    src, dst = pools()
    senders, recv = rig_group(rig, src, dst, cp=1, timeout=1.5, grace=10.0)
    sender = senders[0]
    s_ids, d_ids = torch.tensor([0, 1]), torch.tensor([5, 6])  # guards: pages 4 and 7
    before = snapshot(dst)
    recv.expect(9, d_ids, num_tokens=2 * PS)
    sender.send_layers(9, s_ids, 2)
    assert until(lambda: recv.layers_ready(9) == 2 or recv.poll(9) in DONE)
    assert recv.layers_ready(9) == 2
    assert recv.wait(9, 10) is KVStatus.Failed and "timed out" in recv.reason(9)
    assert len(recv.arena.live_slots) == 1  # quarantined: the sender may still write
    after_fail = snapshot(dst)
    for name in ("k", "v"):
        for layer in range(LAYERS):
            keep = [p for p in range(16) if p not in (5, 6)]
            assert torch.equal(after_fail[name][layer][keep], before[name][layer][keep])
    sender.send_layers(9, s_ids, LAYERS, last=True)  # late: refused before any write
    assert sender.wait(9, 10) is KVStatus.Failed
    assert "receiver failed the request" in sender.reason(9)
    assert recv.settle(10) and recv.arena.live_slots == []
    assert_cache_equals(dst, after_fail, "pool after the late layers")
    close_all(senders, recv)


def test_send_layers_checks_its_inputs_before_queueing(rig):
    src, dst = pools()
    senders, recv = rig_group(rig, src, dst, cp=1)
    s = senders[0]
    ids = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="upto: expected an int, got float"):
        s.send_layers(1, ids, 1.0)
    with pytest.raises(ValueError, match=r"upto: expected 0 <= upto <= 4, got 5"):
        s.send_layers(1, ids, 5)
    with pytest.raises(ValueError, match="last: chunks .* have not reported every layer"):
        s.send_layers(1, ids, 3, last=True)
    with pytest.raises(ValueError, match="coalesce: expected a non-negative int"):
        KVSender(src, s.control, coalesce=-1)
    assert s._jobs.empty() and s.poll(1) is KVStatus.Bootstrapping
    s.send_layers(1, ids, 3, chunk=(0, 1))
    with pytest.raises(ValueError, match=r"upto: expected at least 3 .* got 2"):
        s.send_layers(1, ids, 2, chunk=(0, 1))
    with pytest.raises(ValueError, match=r"last: chunks \[\(0, 1\)\]"):
        s.send_layers(1, ids, 4, chunk=(1, 2), last=True)
    close_all(senders, recv)


def test_quick_bench_and_its_figures(tmp_path):
    """`cpkv bench layerwise --quick` writes exposed-fraction rows with provenance and a
    timeline; `cpkv plot layerwise timeline` draws both."""
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "cpkv.cli", *args], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr

    cli("bench", "layerwise", "--quick", "--shapes", "C", "--page-sizes", "16", "--out",
        str(tmp_path / "layerwise.csv"), "--timeline", str(tmp_path / "timeline.csv"))
    with (tmp_path / "layerwise.csv").open() as f:
        rows = list(csv.DictReader(f))
    fractions = {(r["provider"], r["pattern"]) for r in rows
                 if r["op"] == "layerwise" and r["metric"] == "exposed_fraction"}
    assert fractions == {(p, f"compute{r}x") for p in ("send-after-prefill", "layer-by-layer")
                         for r in ("0.5", "1", "2")}
    assert all(r["device"] and r["git_sha"] is not None and float(r["p50"]) > 0 for r in rows)
    with (tmp_path / "timeline.csv").open() as f:
        spans = list(csv.DictReader(f))
    assert {s["what"] for s in spans} >= {"compute", "pack", "wire", "unpack", "success"}
    cli("plot", "layerwise", "timeline", "--results", str(tmp_path), "--out", str(tmp_path))
    for name in ("layerwise", "timeline"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
