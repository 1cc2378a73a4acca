"""Many-to-many in real processes (issue 19): 2 prefill instances of other TP sizes (6 ranks)
and 2 decode receivers, requests routed at random; a prefill rank killed and restarted while
the others keep working; threads and descriptors flat. See mesh_worker.py."""

import pytest
from mesh_worker import WORLD, rank_main
from mp import assert_ok, spawn_group

pytestmark = [pytest.mark.mp, pytest.mark.slow]


@pytest.fixture(scope="module")
def results():
    return spawn_group(rank_main, WORLD, timeout=400)


@pytest.mark.parametrize("scenario", ["mesh", "restart", "flat", "flat-counts"])
def test_many_to_many_across_processes(results, scenario):
    assert_ok(results, scenario)
