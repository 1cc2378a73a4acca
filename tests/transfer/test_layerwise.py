"""Layer-wise sends and the streaming receiver (issue 11): a runner reports layers as its
forward pass computes them, each newly ready layer group is shipped and unpacked at once, and
Success still means every layer of every route is in the pool. One process: real Mooncake
engines on TCP loopback, real sockets; pools compared with torch.equal."""

import csv
import subprocess
import sys

import pytest
import torch
from kvtest import assert_cache_equals, fill_sentinel, make_cache, mha, oracle_unpack, snapshot
from mp import wait_for
from txtest import DONE, Group, wait_all

from cpkv.transfer import KVReceiver, KVSender, KVStatus, ParallelRank, ParallelSizes
from cpkv.transfer.protocol import Note

PS, LAYERS = 4, 4


def pools(src_pages=16, dst_pages=16, src_layers=LAYERS, dst_layers=LAYERS, heads=2):
    src = make_cache(mha(num_heads=heads), num_layers=src_layers, num_pages=src_pages,
                     page_size=PS, seed=1)
    dst = fill_sentinel(make_cache(mha(), num_layers=dst_layers, num_pages=dst_pages,
                                   page_size=PS, seed=2))
    return src, dst


def until(cond, timeout=10.0):
    """Poll ``cond`` (bounded); True once it holds."""
    try:
        wait_for(cond, timeout)
    except TimeoutError:
        return cond()
    return True


def layer_group(rig, src, dst, **kw):
    return Group(src, dst, rig, sender_kw={"coalesce": 0}, **kw)


def test_layers_stream_into_the_pool_as_the_runner_reports_them(rig):
    """CP 2, one call per layer: after layers [0, 2) the receiver has those layers of the
    request's pages bit-exact, the rest untouched, and not Success; then all of it."""
    src, dst = pools()
    g = layer_group(rig, src, dst)
    recv = g.recv
    s_ids, d_ids = torch.randperm(16)[:5], torch.randperm(16)[:5]
    n = 5 * PS - 1
    before = snapshot(dst)
    want = oracle_unpack(src, s_ids, dst, d_ids, n, range(LAYERS), range(2), range(LAYERS),
                         range(2))
    g.expect(7, d_ids, n)
    assert recv.layers_ready(7) == 0
    for upto in (1, 2):
        for s in g.senders:
            s.send_layers(7, s_ids, upto, to=recv.address, num_tokens=n)
    assert until(lambda: recv.poll(7) is KVStatus.Transferring and recv.layers_ready(7) == 2)
    now = snapshot(dst)
    for c in ("k", "v"):
        for layer in range(LAYERS):
            assert torch.equal(now[c][layer], (want if layer < 2 else before)[c][layer])
    for upto in (3, 4):
        for s in g.senders:
            s.send_layers(7, s_ids, upto, to=recv.address, num_tokens=n, last=upto == 4,
                          metadata=b"tok" if upto == 4 else None)
    assert g.wait(7) == [KVStatus.Success] * 3
    assert recv.layers_ready(7) == LAYERS and recv.metadata(7) == b"tok"
    assert_cache_equals(dst, want)
    g.close()


def test_chunked_prefill_layer_by_layer_with_empty_shares(rig):
    """10 pages over 2 ranks (shares [0, 5) and [5, 10)), chunks [0, 3), [5, 10), [3, 5):
    each chunk's share is empty on one rank, layers reported one by one per chunk."""
    src, dst = pools()
    g = layer_group(rig, src, dst)
    recv = g.recv
    s_ids, d_ids = torch.randperm(16)[:10], torch.randperm(16)[:10]
    n = 10 * PS - 2
    want = oracle_unpack(src, s_ids, dst, d_ids, n, range(LAYERS), range(2), range(LAYERS),
                         range(2))
    g.expect(1, d_ids, n)
    chunks = [(0, 3), (5, 10), (3, 5)]
    for i, chunk in enumerate(chunks):
        for upto in range(1, LAYERS + 1):
            last = i == len(chunks) - 1 and upto == LAYERS
            for s in g.senders:
                s.send_layers(1, s_ids, upto, to=recv.address, num_tokens=n, chunk=chunk,
                              last=last)
        if not i:  # the first chunk's pages are complete, the second's not yet sent
            assert until(lambda: recv.poll(1) is KVStatus.Transferring)
            assert recv.layers_ready(1) == 0
    assert g.wait(1) == [KVStatus.Success] * 3
    assert_cache_equals(dst, want)
    g.close()


def test_tp_pp_routes_with_layers_starting_above_zero(rig):
    """Two prefill TP ranks (one head each, every layer) feed the second pipeline stage of a
    TP 1, PP 2 decode instance: prefill layers [2, 4) land in layers [0, 2) of the decode
    pool, each TP rank's head in its own head. Reports below layer 2 ship nothing; the
    partial count follows the slowest route's layer."""
    srcs = [make_cache(mha(num_heads=1), num_layers=4, num_pages=8, page_size=PS, seed=10 + t)
            for t in range(2)]
    _, dst = pools(dst_layers=2)
    g = layer_group(rig, None, dst, sizes=ParallelSizes(cp=2, tp=2), srcs=lambda r: srcs[r.tp],
                    rank=ParallelRank(pp=1), dsizes=ParallelSizes(pp=2), num_layers=4)
    recv, senders = g.recv, g.senders
    s_ids, d_ids = torch.randperm(8)[:3], torch.randperm(16)[:3]
    n = 3 * PS
    want = snapshot(dst)
    for t in range(2):
        want = oracle_unpack(srcs[t], s_ids, dst, d_ids, n, range(2, 4), range(1), range(2),
                             range(t, t + 1), want=want)
    before = snapshot(dst)
    g.expect(3, d_ids, n)
    for s in senders:  # layers 0 and 1 are not this stage's
        s.send_layers(3, s_ids, 2, to=recv.address, num_tokens=n)
    for s in senders[:2]:  # route tp0 reaches layer 3; route tp1 still at 2
        s.send_layers(3, s_ids, 3, to=recv.address, num_tokens=n)
    pages = d_ids.tolist()
    assert until(lambda: recv.poll(3) is KVStatus.Transferring and torch.equal(
        snapshot(dst)["v"][0][pages, :, 0], want["v"][0][pages, :, 0]))
    assert recv.layers_ready(3) == 0  # route tp1's layer 0 is missing
    now = snapshot(dst)
    assert torch.equal(now["k"][0][pages, :, 0], want["k"][0][pages, :, 0])
    assert torch.equal(now["k"][0][:, :, 1], before["k"][0][:, :, 1])
    assert torch.equal(now["k"][1], before["k"][1])
    for s in senders[2:]:
        s.send_layers(3, s_ids, 3, to=recv.address, num_tokens=n)
    assert until(lambda: recv.layers_ready(3) == 1)
    for s in senders:
        s.send_layers(3, s_ids, 4, to=recv.address, num_tokens=n, last=True)
    assert g.wait(3) == [KVStatus.Success] * 5
    assert_cache_equals(dst, want)
    g.close()


def test_small_layers_are_coalesced(rig):
    """With the default threshold a tiny request's per-layer reports ship as one group when
    the chunk's last layer is ready: one notification with every layer, then the last."""
    src, dst = pools()
    recv = KVReceiver(dst, engine=rig[0], arena=rig[2])
    sender = KVSender(src, instance="p", engine=rig[0], arena=rig[1])
    notes = []
    handle = recv._accept
    recv._accept = lambda req, sid, link, note: (notes.append(note), handle(req, sid, link,
                                                                            note))[1]
    recv.expect(5, torch.tensor([3, 4]), source="p", num_tokens=2 * PS)
    for upto in range(1, LAYERS + 1):
        sender.send_layers(5, torch.tensor([1, 2]), upto, to=recv.address)
    assert until(lambda: len(notes) == 1)
    assert isinstance(notes[0], Note) and notes[0].layers == (0, LAYERS)
    sender.send_layers(5, torch.tensor([1, 2]), LAYERS, to=recv.address, last=True)
    assert wait_all([(recv, 5), (sender, 5)]) == [KVStatus.Success] * 2
    assert len(notes) == 2 and notes[1].nbytes == 0 and notes[1].last
    sender.close()
    recv.close()


@pytest.mark.slow
def test_failure_mid_stream_leaves_other_pages_untouched_and_fences_the_slot(rig):
    """The sender reports two of four layers and stalls: they land, the receiver times out.
    Only the request's pages changed (guards around them did not), the slot stays fenced
    until the sender says it writes no more, and its late layers are refused unwritten."""
    src, dst = pools()
    g = layer_group(rig, src, dst, cp=1, timeout=1.5, grace=10.0)
    recv, sender = g.recv, g.senders[0]
    s_ids, d_ids = torch.tensor([0, 1]), torch.tensor([5, 6])  # guards: pages 4 and 7
    before = snapshot(dst)
    g.expect(9, d_ids, 2 * PS)
    sender.send_layers(9, s_ids, 2, to=recv.address)
    assert until(lambda: recv.layers_ready(9) == 2 or recv.poll(9) in DONE)
    assert recv.layers_ready(9) == 2
    assert recv.wait(9, 10) is KVStatus.Failed and "timed out" in recv.reason(9)
    after_fail = snapshot(dst)
    for name in ("k", "v"):
        for layer in range(LAYERS):
            keep = [p for p in range(16) if p not in (5, 6)]
            assert torch.equal(after_fail[name][layer][keep], before[name][layer][keep])
    assert sender.wait(9, 10) is KVStatus.Failed  # it heard the verdict and said it stopped
    assert "failed the request" in sender.reason(9)
    sender.send_layers(9, s_ids, LAYERS, to=recv.address, last=True)  # late: refused unsent
    assert recv.settle(10) and recv.arena.live_slots == []
    assert_cache_equals(dst, after_fail, "pool after the late layers")
    g.close()


def test_send_layers_checks_its_inputs_before_queueing(rig):
    src, dst = pools()
    g = layer_group(rig, src, dst, cp=1)
    s, to = g.senders[0], g.recv.address
    ids = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="upto: expected an int, got float"):
        s.send_layers(1, ids, 1.0, to=to)
    with pytest.raises(ValueError, match=r"upto: expected an int in \[0, 4\], got 5"):
        s.send_layers(1, ids, 5, to=to)
    with pytest.raises(ValueError, match="last: chunks .* have not reported every layer"):
        s.send_layers(1, ids, 3, to=to, last=True)
    with pytest.raises(ValueError, match="coalesce: expected an int >= 0"):
        KVSender(src, coalesce=-1, engine=rig[0], arena=rig[1])
    assert s._jobs == [] and s.poll(1) is KVStatus.Bootstrapping
    s.send_layers(1, ids, 3, to=to, chunk=(0, 1))
    with pytest.raises(ValueError, match=r"upto: expected at least 3 .* got 2"):
        s.send_layers(1, ids, 2, to=to, chunk=(0, 1))
    with pytest.raises(ValueError, match=r"last: chunks \[\(0, 1\)\]"):
        s.send_layers(1, ids, 4, to=to, chunk=(1, 2), last=True)
    g.close()


@pytest.mark.mp
@pytest.mark.slow
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
