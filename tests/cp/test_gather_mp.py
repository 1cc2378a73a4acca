"""all_gather_kv and the shared-memory arena across real processes (gloo on loopback).

Ranks are spawned once per group size; each runs every scenario and reports; the tests below
assert what each rank reported.
"""

import pytest
from cp_worker import rank_main, scenarios
from mp import assert_ok, spawn_group

pytestmark = [pytest.mark.mp, pytest.mark.slow]

WORLDS = [2, 3]
NAMES = (["status-agreement", "arena-offsets-and-peers", "arena-asymmetry-detected"]
         + [s["name"] for s in scenarios(2)]
         + ["chunked-prefill-mid-page", "torch-floor-all-gather-into-tensor",
            "local-copies-per-component", "other-group-refused",
            "no-sync-after-the-first-layer",
            "arena-empty-after-scenarios", "failing-rank-times-out"])


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"cp{w}")
def group_results(request):
    return spawn_group(rank_main, request.param, timeout=240)


@pytest.mark.parametrize("name", NAMES)
def test_rank_reports(group_results, name):
    assert_ok(group_results, name)
