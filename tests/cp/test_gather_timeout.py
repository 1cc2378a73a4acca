"""all_gather_kv observes its own timeout (gloo): a rank that never joins the collective but
stays alive must make the others raise GatherTimeoutError within ``timeout`` plus slack.

The absent rank stays alive until every waiting rank has reported (or well past the bound), so
the waiting ranks can only finish by their own timeout: a wait without it would block until the
absent rank exits (the bound below) or the process group's 60 s timeout, and fail the elapsed
check. Ranks are spawned once for the module.
"""

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from kvtest import (
    assert_cache_equals,
    fill_sentinel,
    full_kv,
    local_shard,
    make_cache,
    mha,
    snapshot,
)
from mp import Recorder, assert_ok, spawn_group, wait_for

from cpkv.cp import GatherTimeoutError, all_gather_kv, gather_nbytes, zigzag_split

pytestmark = [pytest.mark.mp, pytest.mark.slow]

TIMEOUT = 2.0  # the gather's own bound, seconds
SLACK = 6.0  # allowed past it on a loaded 2-core box
ABSENT_STAYS = TIMEOUT + SLACK + 6.0  # the absent rank outlives any passing wait by this
ABSENT = 1


def waiting_rank(rank, world, marks: Path):
    plan = zigzag_split(4 * world, world)
    cache = fill_sentinel(make_cache(mha(), num_layers=1, num_pages=4, page_size=4))
    before = snapshot(cache)
    local = {n: t[0] for n, t in local_shard(full_kv(mha(), 1, plan.total_len), plan,
                                               rank).items()}
    slot = torch.empty(gather_nbytes(cache, plan, layers=0), dtype=torch.uint8)
    t0 = time.monotonic()
    try:
        all_gather_kv(local, plan, cache, torch.arange(4), slot=slot, layers=0,
                      timeout=TIMEOUT, backend="torch")
    except GatherTimeoutError as e:
        elapsed = time.monotonic() - t0
        assert f"within {TIMEOUT} s" in str(e), e
        assert TIMEOUT - 0.5 <= elapsed <= TIMEOUT + SLACK, \
            f"raised after {elapsed:.1f} s, expected within {TIMEOUT} + {SLACK} s"
    else:
        raise AssertionError("all_gather_kv completed without the absent rank")
    finally:
        (marks / f"done{rank}").touch()
    assert_cache_equals(cache, before, "pool after a timed-out gather")


def absent_rank(world, marks: Path):
    """Never joins the gather; alive until every waiting rank reported (bounded)."""
    waiting = [r for r in range(world) if r != ABSENT]
    wait_for(lambda: all((marks / f"done{r}").exists() for r in waiting), ABSENT_STAYS,
             interval=0.05, fail=False)  # past the bound a waiting rank reports for itself


def rank_main(rank, world, port, out_path):
    rec = Recorder(out_path)
    marks = Path(out_path).parent
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        if rank == ABSENT:
            rec.run("gather-times-out", absent_rank, world, marks)
        else:
            rec.run("gather-times-out", waiting_rank, rank, world, marks)
    except Exception as e:  # reported as its own entry; the parent's asserts name it
        rec.results["rank-setup"] = f"{type(e).__name__}: {e}"
    finally:
        rec.save()
        os._exit(0)  # the gloo group is unusable after the timeout: do not tear it down


def test_gather_observes_its_own_timeout():
    """3 ranks: two wait for the absent one (so both see the timeout, not a closed socket)."""
    assert_ok(spawn_group(rank_main, 3, timeout=120), "gather-times-out")
